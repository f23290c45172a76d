//! The engine under faults, on the GPU (the item 8), with the tiny
//! golden Qwen2 (`tests/golden/qwen2-tiny`, f32 so outputs compare exactly):
//!
//! - a KV pool sized for one sequence serves 8 concurrent requests: they
//!   all finish, by preemption and recompute, with the outputs each gets
//!   alone and no leaked block;
//! - a request that can never fit is refused at `add` with a typed error
//!   while the engine keeps serving the others, and one that outgrows the
//!   whole pool mid-generation ends with `KvPoolExhausted`, never a hang;
//! - 1000 random aborts between steps leave the free-block count where it
//!   started and the scheduler's books consistent.
//!
//! The CPU scheduler tests (`workbench::engine::scheduler`) cover the same
//! policies without a GPU; these run them through the real model, KV pool,
//! CUDA graphs and GPU sampler.

mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;
use workbench::engine::config::Qwen2Config;
use workbench::engine::model::WeightSource;
use workbench::engine::runner::{Engine, EngineConfig};
use workbench::engine::sampler::SamplingParams;
use workbench::engine::scheduler::{FinishReason, Request, RequestError, SeqId};

const CONFIG: &str = include_str!("golden/qwen2-tiny/config.json");
const SAFETENSORS: &[u8] = include_bytes!("golden/qwen2-tiny/model.safetensors");

/// Most steps any scenario may take: a hang fails instead of spinning.
const STEP_LIMIT: usize = 20_000;

fn engine(gpu: &kernels::Gpu, ec: EngineConfig) -> Engine<f32> {
    let cfg = Qwen2Config::from_json_str(CONFIG).expect("golden config.json parses");
    let st = SafeTensors::deserialize(SAFETENSORS).expect("golden model.safetensors parses");
    let get = |name: &str| common::f32_tensor(&st, name);
    Engine::<f32>::new(gpu, &cfg, WeightSource::Tensors(&get), ec).expect("engine loads")
}

/// 64-token contexts in blocks of 16: one sequence fills 4 blocks.
fn config(num_blocks: usize) -> EngineConfig {
    EngineConfig {
        max_num_seqs: 16,
        max_batched_tokens: 256,
        max_model_len: 64,
        gpu_memory_utilization: 0.9,
        num_blocks: Some(num_blocks),
        cuda_graphs: true,
        decode_split_tokens: 0,
        fused_decode_qkv: true,
        decode_attention: kernels::paged_attention::PRODUCTION,
        prefill_attention: kernels::prefill_attention::PRODUCTION,
        gemm: Default::default(),
        pdl: false,
        split_k: 0,
    }
}

fn greedy(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn request(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        id,
        prompt,
        params: greedy(max_tokens, id),
        eos: vec![],
    }
}

/// Steps until every sequence is done; returns (request id, completion,
/// finish reason) per finished sequence, and the number of steps.
#[allow(clippy::type_complexity)]
fn drain(
    gpu: &kernels::Gpu,
    e: &mut Engine<f32>,
) -> (Vec<(u64, Vec<u32>, Option<FinishReason>)>, usize) {
    let mut out = Vec::new();
    let mut steps = 0;
    while !e.is_finished() {
        e.step(gpu).expect("engine step");
        for f in e.take_finished() {
            out.push((
                f.seq.request_id,
                f.seq.completion().to_vec(),
                f.seq.finish_reason(),
            ));
        }
        steps += 1;
        assert!(steps < STEP_LIMIT, "the engine did not finish");
    }
    (out, steps)
}

fn assert_no_leak(e: &Engine<f32>) {
    let bm = e.sched.block_manager();
    assert_eq!(bm.num_free(), bm.num_blocks(), "KV blocks leaked");
    e.sched
        .check_invariants()
        .expect("scheduler books consistent");
}

/// 8 prompts of 9..=30 tokens, each asking for 64 − prompt tokens, so every
/// one of them alone fills the 4-block pool by its end.
fn eight_requests() -> Vec<(Vec<u32>, usize)> {
    let mut rng = SmallRng::seed_from_u64(8);
    (0..8)
        .map(|i| {
            let len = 9 + 3 * i;
            let prompt = (0..len).map(|_| rng.random_range(0..256u32)).collect();
            (prompt, 64 - len)
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pool_for_one_sequence_serves_eight_by_preemption() {
    let gpu = common::gpu();
    let reqs = eight_requests();
    // Each alone, in a roomy pool.
    let mut solo = Vec::new();
    for (i, (p, n)) in reqs.iter().enumerate() {
        let mut e = engine(&gpu, config(64));
        e.add(request(i as u64, p.clone(), *n)).expect("accepted");
        let (done, _) = drain(&gpu, &mut e);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].2, Some(FinishReason::MaxTokens));
        assert_eq!(done[0].1.len(), *n);
        solo.push(done[0].1.clone());
        assert_no_leak(&e);
    }
    // All 8 at once in a pool that holds one 64-token sequence.
    let mut e = engine(&gpu, config(4));
    for (i, (p, n)) in reqs.iter().enumerate() {
        e.add(request(i as u64, p.clone(), *n)).expect("accepted");
    }
    let (mut done, steps) = drain(&gpu, &mut e);
    let preemptions = e.sched.num_preemptions();
    println!("8 requests, 4-block pool: {steps} steps, {preemptions} preemptions");
    assert!(preemptions > 0, "a one-sequence pool must preempt");
    assert_eq!(done.len(), 8, "every request finishes");
    done.sort_by_key(|d| d.0);
    for (i, (id, tokens, reason)) in done.iter().enumerate() {
        assert_eq!(*id, i as u64);
        assert_eq!(*reason, Some(FinishReason::MaxTokens), "request {id}");
        assert_eq!(
            tokens, &solo[i],
            "request {id}: output differs from its solo run"
        );
    }
    assert_no_leak(&e);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_requests_that_cannot_fit_end_with_an_error_not_a_hang() {
    let gpu = common::gpu();
    // Two blocks (32 tokens) in all, contexts of up to 64 allowed.
    let mut e = engine(&gpu, config(2));
    // Its prompt alone needs 3 blocks: refused at once, typed, nothing queued.
    let err = e
        .add(request(1, vec![5; 40], 4))
        .expect_err("a prompt larger than the pool");
    assert!(
        matches!(
            err,
            RequestError::ExceedsKvPool {
                blocks_needed: 3,
                num_blocks: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(e.is_finished(), "the refused request left nothing behind");
    // Fits to start with, outgrows the pool at 32 tokens: stopped there.
    e.add(request(2, vec![9; 20], 40)).expect("accepted");
    // A small one beside it, which must still be served in full.
    e.add(request(3, vec![7; 4], 6)).expect("accepted");
    let (done, steps) = drain(&gpu, &mut e);
    println!("outgrowing request: {steps} steps, {done:?}");
    let get = |id| done.iter().find(|d| d.0 == id).expect("finished");
    let big = get(2);
    assert_eq!(big.2, Some(FinishReason::KvPoolExhausted));
    assert!(
        !big.1.is_empty() && 20 + big.1.len() <= 33,
        "{} tokens generated past a 32-token pool",
        big.1.len()
    );
    let small = get(3);
    assert_eq!(small.2, Some(FinishReason::MaxTokens));
    assert_eq!(small.1.len(), 6);
    assert_no_leak(&e);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_thousand_random_aborts_leave_the_pool_whole() {
    let gpu = common::gpu();
    let mut e = engine(&gpu, config(24));
    let free_at_start = e.sched.block_manager().num_free();
    let mut rng = SmallRng::seed_from_u64(1000);
    let mut live: Vec<SeqId> = Vec::new();
    let (mut aborts, mut next_id, mut steps, mut finished) = (0usize, 0u64, 0usize, 0usize);
    while aborts < 1000 {
        // Keep 6..=12 sequences queued or running, of mixed lengths.
        while live.len() < rng.random_range(6..=12) {
            let len = rng.random_range(1..=40);
            let prompt = (0..len).map(|_| rng.random_range(0..256u32)).collect();
            let n = rng.random_range(1..=64 - len);
            live.push(e.add(request(next_id, prompt, n)).expect("accepted"));
            next_id += 1;
        }
        // Abort 0..=3 random live sequences, waiting or running.
        for _ in 0..rng.random_range(0..=3) {
            if live.is_empty() || aborts == 1000 {
                break;
            }
            let id = live.swap_remove(rng.random_range(0..live.len()));
            let seq = e.abort(id).expect("abort a live sequence");
            assert_eq!(seq.finish_reason(), Some(FinishReason::Aborted));
            aborts += 1;
        }
        e.sched.check_invariants().expect("books after aborts");
        e.step(&gpu).expect("engine step");
        for f in e.take_finished() {
            live.retain(|&s| s != f.seq.id);
            finished += 1;
        }
        steps += 1;
        assert!(steps < STEP_LIMIT, "the engine did not finish");
    }
    // Abort what is left, then the pool must be whole again.
    for id in live.drain(..) {
        e.abort(id).expect("abort a live sequence");
    }
    assert!(e.is_finished());
    println!(
        "{aborts} aborts over {steps} steps, {finished} finished normally, {} preemptions",
        e.sched.num_preemptions()
    );
    assert!(finished > 0, "some sequences must also finish normally");
    assert_eq!(e.sched.block_manager().num_free(), free_at_start);
    assert_no_leak(&e);
}
