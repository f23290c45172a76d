//! Programmatic dependent launch changes when kernels start, never what
//! they compute: the bf16 engine (the 0.5B preset's layer shapes, 2 layers,
//! seeded random weights) must produce the same greedy tokens with it on
//! and off, under CUDA graphs and eagerly. A kernel that read the previous
//! kernel's output before `pdl_wait()`, or a v5f prologue that read the
//! projection early, shows up here as a changed token.

mod common;

use workbench::engine::config::Qwen2Config;
use workbench::engine::model::WeightSource;
use workbench::engine::runner::{Engine, EngineConfig};
use workbench::engine::sampler::SamplingParams;
use workbench::engine::scheduler::Request;

fn config(cuda_graphs: bool, pdl: bool) -> EngineConfig {
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
        gemm: Default::default(),
        pdl,
    }
}

/// Greedy completions of 24 prompts of 7..=283 tokens, 48 tokens each, and
/// whether programmatic dependent launch was on.
fn run(gpu: &kernels::Gpu, ec: EngineConfig) -> (Vec<Vec<u32>>, bool, usize) {
    let mut cfg = Qwen2Config::preset("qwen2-0.5b").unwrap();
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 1024;
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
    let mut done = Vec::new();
    let mut steps = 0;
    while !engine.is_finished() {
        engine.step(gpu).expect("engine step");
        done.extend(engine.take_finished());
        steps += 1;
        assert!(steps < 10_000, "engine does not finish");
    }
    done.extend(engine.take_finished());
    let graphs = engine.model.num_graphs();
    let out = ids
        .iter()
        .map(|id| {
            done.iter()
                .find(|f| f.seq.id == *id)
                .map(|f| f.seq.completion().to_vec())
                .expect("every request finishes")
        })
        .collect();
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
    let (plain, on0, _) = run(&gpu, config(true, false));
    assert!(!on0, "pdl: false must leave it off");
    let (pdl, on1, graphs) = run(&gpu, config(true, true));
    assert!(on1, "pdl: true must turn it on on an sm_90 card");
    assert!(
        graphs > 0,
        "decode steps must have replayed captured graphs"
    );
    assert_eq!(pdl, plain, "CUDA graphs: PDL on vs off");
    let (eager, _, _) = run(&gpu, config(false, true));
    assert_eq!(eager, plain, "eager with PDL vs graphs without");
    assert!(plain.iter().all(|c| c.len() == 48));
}
