//! The CPU reference Qwen2 forward (`reference::qwen2`) against Hugging Face
//! transformers' own f32 logits for a tiny random Qwen2
//! (`tests/golden/qwen2-tiny/`, made by `tests/golden/make_qwen2_golden.py`;
//! see `tests/golden/README.md`).
//!
//! The golden files are embedded with `include_bytes!` / `include_str!` so the
//! test does not depend on the directory it runs from. No network, no Python.

use std::collections::HashMap;

mod common;

use kernels::DType;
use ndarray::Array2;
use reference::qwen2::{Qwen2RefConfig, Qwen2Weights};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use workbench::engine::config::Qwen2Config;

const CONFIG: &str = include_str!("golden/qwen2-tiny/config.json");
const SAFETENSORS: &[u8] = include_bytes!("golden/qwen2-tiny/model.safetensors");
const GOLDEN: &str = include_str!("golden/qwen2-tiny/golden.json");

/// ‖Δ‖₂ / ‖ref‖₂ over a prompt's whole `[len, vocab]` logits.
const REL_L2_TOL: f64 = 1e-4;

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

fn ref_config() -> Qwen2RefConfig {
    let c = Qwen2Config::from_json_str(CONFIG).expect("golden config.json parses");
    assert_eq!(c.torch_dtype, DType::F32, "the golden model is f32");
    Qwen2RefConfig {
        hidden: c.hidden_size,
        intermediate: c.intermediate_size,
        layers: c.num_hidden_layers,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        vocab: c.vocab_size,
        eps: c.rms_norm_eps,
        theta: c.rope_theta,
        tie: c.tie_word_embeddings,
    }
}

/// Every tensor of the golden checkpoint, f32 little-endian widened to f64.
fn tensors() -> Tensors {
    let st = SafeTensors::deserialize(SAFETENSORS).expect("golden model.safetensors parses");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}: the golden model is f32");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

fn build(cfg: &Qwen2RefConfig, t: &Tensors) -> Qwen2Weights {
    Qwen2Weights::from_tensors(cfg, |n| t.get(n).cloned()).expect("golden weights load")
}

struct Case {
    prompt: Vec<u32>,
    logits: Array2<f64>, // [len, vocab]
    greedy: Vec<u32>,
}

fn golden_cases(vocab: usize) -> Vec<Case> {
    let g: Value = serde_json::from_str(GOLDEN).expect("golden.json parses");
    assert_eq!(g["schema_version"], 1, "golden.json schema");
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .expect("a list of token ids")
            .iter()
            .map(|x| u32::try_from(x.as_u64().expect("a token id")).expect("fits u32"))
            .collect()
    };
    let cases: Vec<Case> = g["cases"]
        .as_array()
        .expect("golden.json: cases")
        .iter()
        .map(|c| {
            let prompt = ids(&c["prompt"]);
            let rows = c["logits"].as_array().expect("logits rows");
            assert_eq!(rows.len(), prompt.len(), "one logits row per prompt token");
            let flat: Vec<f64> = rows
                .iter()
                .flat_map(|r| {
                    let r = r.as_array().expect("a logits row");
                    assert_eq!(r.len(), vocab, "a logits row has vocab entries");
                    r.iter().map(|x| x.as_f64().expect("a number"))
                })
                .collect();
            Case {
                logits: Array2::from_shape_vec((prompt.len(), vocab), flat).unwrap(),
                greedy: ids(&c["greedy"]),
                prompt,
            }
        })
        .collect();
    let lens: Vec<usize> = cases.iter().map(|c| c.prompt.len()).collect();
    assert_eq!(lens, [1, 5, 17], "golden prompt lengths");
    cases
}

/// (relative L2, max abs) of `ours` against `hf`.
fn diff(ours: &Array2<f64>, hf: &Array2<f64>) -> (f64, f64) {
    assert_eq!(ours.dim(), hf.dim());
    let (mut d2, mut r2, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (a, b) in ours.iter().zip(hf) {
        let d = a - b;
        d2 += d * d;
        r2 += b * b;
        max_abs = max_abs.max(d.abs());
    }
    ((d2 / r2).sqrt(), max_abs)
}

/// Per prompt: (prompt length, relative L2, max abs). Err names every prompt
/// over the tolerance.
fn compare_logits(model: &Qwen2Weights, cases: &[Case]) -> Result<Vec<(usize, f64, f64)>, String> {
    let mut stats = Vec::new();
    let mut failures = Vec::new();
    for c in cases {
        let ours = model.forward(&c.prompt).expect("forward");
        let (rel, max_abs) = diff(&ours, &c.logits);
        stats.push((c.prompt.len(), rel, max_abs));
        // NaN must fail too.
        if rel.is_nan() || rel > REL_L2_TOL {
            failures.push(format!(
                "prompt of {} tokens: rel L2 {rel:.3e} > {REL_L2_TOL:e} (max abs diff {max_abs:.3e})",
                c.prompt.len()
            ));
        }
    }
    if failures.is_empty() {
        Ok(stats)
    } else {
        Err(failures.join("; "))
    }
}

#[test]
fn reference_logits_match_transformers() {
    let cfg = ref_config();
    let model = build(&cfg, &tensors());
    let cases = golden_cases(cfg.vocab);
    let stats = compare_logits(&model, &cases).unwrap_or_else(|e| panic!("{e}"));
    for (len, rel, max_abs) in stats {
        println!("prompt of {len} tokens: rel L2 {rel:.3e}, max abs diff {max_abs:.3e}");
    }
}

#[test]
fn reference_greedy_matches_transformers() {
    let cfg = ref_config();
    let model = build(&cfg, &tensors());
    for c in golden_cases(cfg.vocab) {
        let ours = model.greedy(&c.prompt, c.greedy.len()).expect("greedy");
        assert_eq!(ours, c.greedy, "greedy continuation of {:?}", c.prompt);
    }
}

/// The comparison must be able to fail: swapping two rows of layer 0's
/// q_proj (two query dims of head 0) must push the logits far out of
/// tolerance. (A one-token prompt is blind to it: a single key gets all the
/// attention whatever q is, so only the longer prompts must fail.)
#[test]
fn perturbed_weights_fail_the_comparison() {
    let cfg = ref_config();
    let mut t = tensors();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (shape, data) = t.get_mut(name).expect("q_proj present");
    let cols = shape[1];
    for j in 0..cols {
        data.swap(j, cols + j);
    }
    let model = build(&cfg, &t);
    let cases = golden_cases(cfg.vocab);
    let err = compare_logits(&model, &cases).expect_err("a perturbed model must not match");
    println!("perturbed q_proj: {err}");
    for c in cases.iter().filter(|c| c.prompt.len() > 1) {
        let (rel, _) = diff(&model.forward(&c.prompt).unwrap(), &c.logits);
        assert!(
            rel > 100.0 * REL_L2_TOL,
            "prompt of {} tokens: rel L2 {rel:.3e} only",
            c.prompt.len()
        );
    }
}

// ---------------------------------------------------------------------------
// The GPU engine (`workbench::engine::model`) against the same golden.

fn gpu_model<T: kernels::Storage>(gpu: &kernels::Gpu) -> workbench::engine::model::GpuModel<T>
where
    kernels::cudarc::cublas::CudaBlas: kernels::cudarc::cublas::Gemm<T>,
{
    let cfg = Qwen2Config::from_json_str(CONFIG).expect("golden config.json parses");
    let st = SafeTensors::deserialize(SAFETENSORS).expect("golden model.safetensors parses");
    let get = |name: &str| common::f32_tensor(&st, name);
    let mut m = workbench::engine::model::GpuModel::<T>::load(gpu, &cfg, &get, 64)
        .expect("golden weights load on the GPU");
    // The engine's decode path: split-K o_proj/down where the dtype allows.
    m.set_split_k(gpu, workbench::engine::runner::DEFAULT_SPLIT_K)
        .expect("split-K partials");
    m
}

fn as_array(logits: Vec<f32>, len: usize, vocab: usize) -> Array2<f64> {
    Array2::from_shape_vec((len, vocab), logits.into_iter().map(f64::from).collect()).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_engine_f32_matches_transformers() {
    let gpu = common::gpu();
    let cfg = ref_config();
    let mut model = gpu_model::<f32>(&gpu);
    for c in golden_cases(cfg.vocab) {
        let ours = as_array(
            model.forward(&gpu, &c.prompt, 0).expect("forward"),
            c.prompt.len(),
            cfg.vocab,
        );
        let (rel, max_abs) = diff(&ours, &c.logits);
        println!(
            "f32 engine, prompt of {} tokens: rel L2 {rel:.3e}, max abs {max_abs:.3e}",
            c.prompt.len()
        );
        assert!(
            rel <= REL_L2_TOL,
            "prompt of {} tokens: rel L2 {rel:.3e}",
            c.prompt.len()
        );
        let greedy = model
            .greedy(&gpu, &c.prompt, c.greedy.len())
            .expect("greedy");
        assert_eq!(greedy, c.greedy, "greedy continuation of {:?}", c.prompt);
    }
}

/// bf16 storage can't match f32 logits closely; it must stay near them and
/// agree on what matters for generation: HF's next token is in our top 5.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_engine_bf16_tracks_transformers() {
    let gpu = common::gpu();
    let cfg = ref_config();
    let mut model = gpu_model::<half::bf16>(&gpu);
    for c in golden_cases(cfg.vocab) {
        let ours = as_array(
            model.forward(&gpu, &c.prompt, 0).expect("forward"),
            c.prompt.len(),
            cfg.vocab,
        );
        let (rel, max_abs) = diff(&ours, &c.logits);
        println!(
            "bf16 engine, prompt of {} tokens: rel L2 {rel:.3e}, max abs {max_abs:.3e}",
            c.prompt.len()
        );
        assert!(
            rel <= 5e-2,
            "prompt of {} tokens: rel L2 {rel:.3e}",
            c.prompt.len()
        );
        let last = ours.row(c.prompt.len() - 1);
        let mut order: Vec<usize> = (0..cfg.vocab).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        assert!(
            order[..5].contains(&(c.greedy[0] as usize)),
            "HF's next token {} not in our top 5 {:?}",
            c.greedy[0],
            &order[..5]
        );
    }
}

// ---------------------------------------------------------------------------
// The batched engine (scheduler + paged pool + GPU sampling) on the same
// golden: greedy output must not change between batch 1 and a full batch,
// nor when a small pool forces preemption by recompute (f32, exact).

fn engine_greedy(
    gpu: &kernels::Gpu,
    ec: workbench::engine::runner::EngineConfig,
    prompts: &[(Vec<u32>, usize)],
) -> (Vec<Vec<u32>>, usize, usize) {
    use workbench::engine::model::WeightSource;
    use workbench::engine::runner::Engine;
    use workbench::engine::sampler::SamplingParams;
    use workbench::engine::scheduler::Request;
    let cfg = Qwen2Config::from_json_str(CONFIG).expect("golden config.json parses");
    let st = SafeTensors::deserialize(SAFETENSORS).expect("golden model.safetensors parses");
    let get = |name: &str| common::f32_tensor(&st, name);
    let mut engine =
        Engine::<f32>::new(gpu, &cfg, WeightSource::Tensors(&get), ec).expect("engine loads");
    let mut ids = Vec::new();
    for (i, (prompt, n)) in prompts.iter().enumerate() {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: *n,
            ignore_eos: true,
            seed: Some(i as u64),
            ..SamplingParams::default()
        };
        ids.push(
            engine
                .add(Request {
                    id: i as u64,
                    prompt: prompt.clone(),
                    params,
                    eos: vec![],
                })
                .expect("request accepted"),
        );
    }
    let out = common::run_to_completion(gpu, &mut engine, &ids);
    assert_eq!(
        engine.sched.block_manager().num_free(),
        engine.sched.block_manager().num_blocks(),
        "blocks leaked"
    );
    let preemptions = engine.sched.num_preemptions();
    let graphs = engine.model.num_graphs();
    (out, preemptions, graphs)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_batched_engine_greedy_is_batch_and_preemption_invariant() {
    use workbench::engine::runner::EngineConfig;
    let gpu = common::gpu();
    let cfg = ref_config();
    let cases = golden_cases(cfg.vocab);
    // Every golden prompt, plus longer generations of the same prompts, so the
    // batch mixes lengths.
    let mut prompts: Vec<(Vec<u32>, usize)> = cases
        .iter()
        .map(|c| (c.prompt.clone(), c.greedy.len()))
        .collect();
    for c in &cases {
        prompts.push((c.prompt.clone(), 24));
    }
    let base = EngineConfig {
        max_num_seqs: 16,
        max_batched_tokens: 256,
        max_model_len: 64,
        gpu_memory_utilization: 0.9,
        num_blocks: Some(64),
        cuda_graphs: false,
        decode_split_tokens: 16,
        fused_decode_qkv: true,
        decode_attention: kernels::paged_attention::PRODUCTION,
        prefill_attention: kernels::prefill_attention::PRODUCTION,
        gemm: Default::default(),
        pdl: false,
        split_k: 0,
    };
    // Batch 1: one sequence at a time.
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            engine_greedy(&gpu, base, std::slice::from_ref(p))
                .0
                .remove(0)
        })
        .collect();
    for (c, out) in cases.iter().zip(&solo) {
        assert_eq!(out, &c.greedy, "batch-1 engine vs HF for {:?}", c.prompt);
    }
    let (batched, _, _) = engine_greedy(&gpu, base, &prompts);
    assert_eq!(batched, solo, "full batch vs batch 1");
    // Decode steps replayed from CUDA graphs (padded batches).
    let graphs = EngineConfig {
        cuda_graphs: true,
        ..base
    };
    let (replayed, _, captured) = engine_greedy(&gpu, graphs, &prompts);
    assert!(
        captured > 0,
        "decode steps must have replayed captured graphs"
    );
    assert_eq!(replayed, solo, "CUDA graphs vs eager");
    // cuBLASLt GEMMs, tuned per batch shape, under graphs.
    let lt = EngineConfig {
        cuda_graphs: true,
        gemm: workbench::engine::model::GemmBackend::LtTuned,
        ..base
    };
    let (lt_out, _, _) = engine_greedy(&gpu, lt, &prompts);
    assert_eq!(lt_out, solo, "tuned cuBLASLt GEMMs vs cublasGemmEx");
    // A pool of 4 blocks (64 tokens) for all of them: preemption by recompute.
    let small = EngineConfig {
        num_blocks: Some(4),
        ..base
    };
    let (pre, preemptions, _) = engine_greedy(&gpu, small, &prompts);
    println!("small pool: {preemptions} preemptions");
    assert!(preemptions > 0, "the small pool must force preemption");
    assert_eq!(pre, solo, "with preemption vs batch 1");
}

/// The engine's prefill attention kernel (bf16, head_dim 64) against the
/// decode kernel run one row per token, on a random-weight model with the
/// 0.5B preset's layer shapes (2 layers, small vocab): same logits within
/// bf16 noise, and each side's next token in the other's top 5.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_engine_prefill_kernel_matches_per_token_decode_rows() {
    let gpu = common::gpu();
    let load = || common::small_05b_model(&gpu);
    let (mut fast, mut rows) = (load(), load());
    assert!(
        fast.prefill_kernel,
        "bf16 with head_dim 64 must use the prefill kernel"
    );
    rows.prefill_kernel = false;
    // Three prompts of 100, 37 and 200 tokens, each on its own run of blocks.
    let lens = [100usize, 37, 200];
    let batch = common::PrefillBatch::new(&lens, 1024, 0);
    let inp = batch.input();
    fast.step(&gpu, &inp).expect("prefill-kernel step");
    rows.step(&gpu, &inp).expect("per-row step");
    let top5 = common::top5;
    for (r, len) in lens.iter().enumerate() {
        let (a, b) = (
            fast.logits_host(&gpu, r).unwrap(),
            rows.logits_host(&gpu, r).unwrap(),
        );
        assert!(
            a.iter().chain(&b).all(|x| x.is_finite()),
            "row {r}: non-finite logits"
        );
        let rel = common::rel_l2(&a, &b);
        println!("sequence {r} ({len} tokens): rel L2 {rel:.3e}");
        assert!(rel <= 2e-2, "sequence {r}: rel L2 {rel:.3e}");
        assert!(top5(&a).contains(&top5(&b)[0]) && top5(&b).contains(&top5(&a)[0]));
    }
}
