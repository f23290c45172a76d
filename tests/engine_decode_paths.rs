//! The engine's optional decode paths, on the bf16 engine with the 0.5B
//! preset's layer shapes (2 layers, seeded random weights):
//!
//! - programmatic dependent launch changes when kernels start, never what
//!   they compute: the same greedy tokens with it on and off, under CUDA
//!   graphs and eagerly (a kernel that read the previous kernel's output
//!   before `pdl_wait()`, or a v5f prologue that read the projection early,
//!   shows up as a changed token);
//! - split-K o_proj and down GEMMs (f32 partials summed by the next add +
//!   RMSNorm) change only the GEMMs' summation order: the decode logits stay
//!   within bf16 noise of the unsplit path, and repeated runs give the same
//!   tokens (the partials are summed in a fixed order).

mod common;

use workbench::engine::model::WeightSource;
use workbench::engine::runner::{Engine, EngineConfig};
use workbench::engine::sampler::SamplingParams;
use workbench::engine::scheduler::Request;

fn config(cuda_graphs: bool, pdl: bool, split_k: usize) -> EngineConfig {
    EngineConfig {
        max_num_seqs: 32,
        max_batched_tokens: 4096,
        max_model_len: 512,
        gpu_memory_utilization: 0.9,
        num_blocks: Some(512),
        cuda_graphs,
        decode_split_tokens: 0,
        fused_decode_qkv: true,
        decode_attention: kernels::paged_attention::PRODUCTION,
        prefill_attention: kernels::prefill_attention::PRODUCTION,
        gemm: Default::default(),
        pdl,
        split_k,
    }
}

/// Greedy completions of 24 prompts of 7..=283 tokens, 48 tokens each, and
/// whether programmatic dependent launch was on.
fn run(gpu: &kernels::Gpu, ec: EngineConfig) -> (Vec<Vec<u32>>, bool, usize) {
    let cfg = common::small_05b_config();
    let mut engine = Engine::<half::bf16>::new(gpu, &cfg, WeightSource::Random { seed: 11 }, ec)
        .expect("engine loads");
    let pdl = gpu.pdl();
    let mut ids = Vec::new();
    for i in 0..24u64 {
        let len = 7 + (i as usize * 37) % 277;
        let prompt = (0..len)
            .map(|p| ((i as usize * 131 + p * 17) % 1024) as u32)
            .collect();
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 48,
            ignore_eos: true,
            seed: Some(i),
            ..SamplingParams::default()
        };
        ids.push(
            engine
                .add(Request {
                    id: i,
                    prompt,
                    params,
                    eos: vec![],
                })
                .expect("request accepted"),
        );
    }
    let out = common::run_to_completion(gpu, &mut engine, &ids);
    let graphs = engine.model.num_graphs();
    (out, pdl, graphs)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pdl_leaves_greedy_tokens_unchanged() {
    let gpu = common::gpu();
    assert!(
        gpu.info().compute_capability.0 >= 9,
        "programmatic dependent launch needs sm_90+; this card is cc {:?}",
        gpu.info().compute_capability
    );
    let (plain, on0, _) = run(&gpu, config(true, false, 0));
    assert!(!on0, "pdl: false must leave it off");
    let (pdl, on1, graphs) = run(&gpu, config(true, true, 0));
    assert!(on1, "pdl: true must turn it on on an sm_90 card");
    assert!(
        graphs > 0,
        "decode steps must have replayed captured graphs"
    );
    assert_eq!(pdl, plain, "CUDA graphs: PDL on vs off");
    // Eagerly, PDL on against off. Not eager against graphs: a graph runs
    // the padded batch over the full table width, the eager step its real
    // rows over the current width, and decode attention's split plan
    // depends on both (v9 splits a sequence only as far as the batch
    // leaves SMs idle), so the two modes may sum in a different order.
    let (eager_plain, _, _) = run(&gpu, config(false, false, 0));
    let (eager, _, _) = run(&gpu, config(false, true, 0));
    assert_eq!(eager, eager_plain, "eager: PDL on vs off");
    // With the split size pinned (64 tokens, the engine's cap), both modes
    // split at the same token boundaries: eager with PDL gives the tokens
    // of graphs without it.
    let pinned = |graphs, pdl| EngineConfig {
        decode_split_tokens: 64,
        ..config(graphs, pdl, 0)
    };
    let (graphs64, _, _) = run(&gpu, pinned(true, false));
    let (eager64, _, _) = run(&gpu, pinned(false, true));
    assert_eq!(
        eager64, graphs64,
        "split 64: eager with PDL vs graphs without"
    );
    assert!(plain.iter().all(|c| c.len() == 48));
    assert!(eager.iter().all(|c| c.len() == 48));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_split_k_is_deterministic_and_tracks_the_unsplit_gemms() {
    use workbench::engine::model::{StepInput, BLOCK_SIZE};
    let gpu = common::gpu();
    // Two runs of the engine with split-K: the same tokens.
    let (a, _, graphs) = run(&gpu, config(true, false, 4));
    let (b, _, _) = run(&gpu, config(true, false, 4));
    assert!(
        graphs > 0,
        "decode steps must have replayed captured graphs"
    );
    assert_eq!(a, b, "split-K runs must repeat exactly");

    // One decode step after a prefill of three sequences, split and not.
    let load = || common::small_05b_model(&gpu);
    let (mut plain, mut split) = (load(), load());
    split.set_split_k(&gpu, 4).expect("split-K partials");
    // Three prompts, with room in their block tables for one more token.
    let lens = [100usize, 37, 200];
    let batch = common::PrefillBatch::new(&lens, 1024, 1);
    let (mbps, seq_table) = (batch.mbps, &batch.seq_table);
    let prefill = batch.input();
    plain.step(&gpu, &prefill).expect("prefill");
    split.step(&gpu, &prefill).expect("prefill");
    // The decode step: token n of each sequence, one row each.
    let (mut dt, mut dp, mut ds, mut dtab, mut dl) = (vec![], vec![], vec![], vec![], vec![]);
    for (s, &n) in lens.iter().enumerate() {
        dt.push(((s * 7 + 3) % 1024) as u32);
        dp.push(n as i32);
        ds.push(seq_table[s][n / BLOCK_SIZE] as i64 * BLOCK_SIZE as i64 + (n % BLOCK_SIZE) as i64);
        dtab.extend_from_slice(&seq_table[s]);
        dl.push(n as i32 + 1);
    }
    let dlast: Vec<i32> = (0..lens.len() as i32).collect();
    let decode = StepInput {
        tokens: &dt,
        positions: &dp,
        slots: &ds,
        tables: &dtab,
        mbps,
        lens: &dl,
        last: &dlast,
        seqs: None,
    };
    plain.step(&gpu, &decode).expect("decode, unsplit");
    split.step(&gpu, &decode).expect("decode, split-K");
    let top5 = common::top5;
    let mut differ = 0;
    for r in 0..lens.len() {
        let (x, y) = (
            split.logits_host(&gpu, r).unwrap(),
            plain.logits_host(&gpu, r).unwrap(),
        );
        assert!(
            x.iter().chain(&y).all(|v| v.is_finite()),
            "row {r}: non-finite logits"
        );
        differ += usize::from(x != y);
        let rel = common::rel_l2(&x, &y);
        println!("row {r}: split-K vs unsplit rel L2 {rel:.3e}");
        assert!(rel <= 1e-2, "row {r}: rel L2 {rel:.3e}");
        assert!(top5(&x).contains(&top5(&y)[0]) && top5(&y).contains(&top5(&x)[0]));
    }
    // The split path must really have run: a different summation order
    // changes some bf16 logits.
    assert!(
        differ > 0,
        "split-K logits are bit-identical to unsplit: did it run?"
    );
}
