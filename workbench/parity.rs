//! Greedy parity with Hugging Face transformers, as vLLM checks its models
//! (`check_logprobs_close`): each side generates greedily on its own and
//! records its top-k log-probabilities at every step; the two token streams
//! must agree until they first differ, and at that step each side's token
//! must be among the other's top k. After a divergence the contexts differ,
//! so nothing later is compared.
//!
//! The HF side comes from `benches/peers/hf_parity.py` (a golden JSON);
//! `workbench parity` runs ours on the GPU and compares with [`compare`].

use crate::engine::config::Qwen2Config;
use crate::engine::model::{GpuModel, ModelError};
use cudarc::cublas::{CudaBlas, Gemm};
use kernels::{Gpu, Storage};
use serde::{Deserialize, Serialize};

/// One generated token and the top-k `(token, log-probability)` of the
/// distribution it was picked from, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub token: u32,
    pub top: Vec<(u32, f64)>,
}

/// One prompt of the golden file and HF's greedy continuation of it.
#[derive(Clone, Debug, Deserialize)]
pub struct GoldenCase {
    pub prompt: Vec<u32>,
    pub steps: Vec<Step>,
}

/// `benches/peers/hf_parity.py`'s output.
#[derive(Clone, Debug, Deserialize)]
pub struct Golden {
    pub schema_version: u32,
    /// How the model was made (shapes, init, seed), for the report.
    pub model: String,
    /// The dtype HF computed in (`bfloat16`, `float32`).
    pub dtype: String,
    pub top_k: usize,
    /// Library versions on the host that made it.
    #[serde(default)]
    pub versions: serde_json::Map<String, serde_json::Value>,
    pub cases: Vec<GoldenCase>,
}

impl Golden {
    /// Parses and checks the file's shape: the schema, k ≥ 1, every step
    /// with k entries and its token first among them (greedy; tied bf16
    /// logits let HF pick any of the tied best, which it lists first).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let g: Golden = serde_json::from_str(text).map_err(|e| format!("not a golden: {e}"))?;
        if g.schema_version != 1 {
            return Err(format!(
                "schema_version {} (this workbench reads 1)",
                g.schema_version
            ));
        }
        if g.top_k == 0 || g.cases.is_empty() {
            return Err("top_k must be at least 1 and there must be cases".into());
        }
        for (i, c) in g.cases.iter().enumerate() {
            if c.prompt.is_empty() || c.steps.is_empty() {
                return Err(format!("case {i}: empty prompt or no steps"));
            }
            for (j, s) in c.steps.iter().enumerate() {
                if s.top.len() != g.top_k || s.top[0].0 != s.token {
                    return Err(format!(
                        "case {i} step {j}: {} top entries (want {}) or its token {} is not the first",
                        s.top.len(),
                        g.top_k,
                        s.token
                    ));
                }
            }
        }
        Ok(g)
    }
}

/// The top `k` of `logits` as `(token, log-probability)`, best first; the
/// log-softmax is taken in f64. NaN logits rank last.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f64)> {
    let max = logits
        .iter()
        .filter(|x| !x.is_nan())
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let lse = max
        + logits
            .iter()
            .filter(|x| !x.is_nan())
            .map(|&x| (f64::from(x) - max).exp())
            .sum::<f64>()
            .ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let key = |i: u32| {
        let x = logits[i as usize];
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x
        }
    };
    // Highest first; ties by the lower id, as torch.topk / argmax pick.
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        key(b).total_cmp(&key(a)).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i, f64::from(logits[i as usize]) - lse))
        .collect()
}

/// How one prompt compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseResult {
    pub steps: usize,
    /// Tokens equal before the first difference (`steps` when none).
    pub matched: usize,
    /// At the first difference: our token's rank in HF's top k and HF's
    /// token's rank in ours (0-based), `None` when outside.
    pub ours_in_hf: Option<usize>,
    pub hf_in_ours: Option<usize>,
    /// Largest |Δ log-probability| of the chosen token over the matched
    /// steps (how close the two distributions are where they agree).
    pub max_logprob_diff: f64,
    pub pass: bool,
}

/// vLLM's rule over two greedy runs of the same prompt (see the module doc).
pub fn compare(ours: &[Step], hf: &[Step]) -> CaseResult {
    let steps = ours.len().min(hf.len());
    let rank = |top: &[(u32, f64)], t: u32| top.iter().position(|&(id, _)| id == t);
    let mut max_diff = 0.0f64;
    for i in 0..steps {
        let (a, b) = (&ours[i], &hf[i]);
        if a.token == b.token {
            let lp = |s: &Step| s.top.iter().find(|e| e.0 == s.token).map(|e| e.1);
            if let (Some(x), Some(y)) = (lp(a), lp(b)) {
                max_diff = max_diff.max((x - y).abs());
            }
            continue;
        }
        let (ours_in_hf, hf_in_ours) = (rank(&b.top, a.token), rank(&a.top, b.token));
        return CaseResult {
            steps,
            matched: i,
            ours_in_hf,
            hf_in_ours,
            max_logprob_diff: max_diff,
            pass: ours_in_hf.is_some() && hf_in_ours.is_some(),
        };
    }
    CaseResult {
        steps,
        matched: steps,
        ours_in_hf: None,
        hf_in_ours: None,
        max_logprob_diff: max_diff,
        pass: ours.len() == hf.len(),
    }
}

/// Our side: the engine's model generates greedily from each golden
/// prompt as many tokens as HF did, recording its own top `k` at every step
/// (one sequence at a time; the batched engine is held to these same
/// outputs by the batch, graph and preemption invariance tests).
pub fn generate_ours<T: Storage>(
    gpu: &Gpu,
    cfg: &Qwen2Config,
    get: &dyn Fn(&str) -> Option<Vec<f32>>,
    golden: &Golden,
) -> Result<Vec<Vec<Step>>, ModelError>
where
    CudaBlas: Gemm<T>,
{
    let capacity = golden
        .cases
        .iter()
        .map(|c| c.prompt.len() + c.steps.len())
        .max()
        .unwrap_or(1);
    let mut model = GpuModel::<T>::load(gpu, cfg, get, capacity)?;
    // The engine's decode path (split-K o_proj/down where the dtype allows).
    model.set_split_k(gpu, crate::engine::runner::DEFAULT_SPLIT_K)?;
    let vocab = cfg.vocab_size;
    let mut all = Vec::with_capacity(golden.cases.len());
    for c in &golden.cases {
        let n = c.steps.len();
        let logits = model.forward(gpu, &c.prompt, 0)?;
        let mut row = logits[(c.prompt.len() - 1) * vocab..].to_vec();
        let mut steps = Vec::with_capacity(n);
        for i in 0..n {
            let top = top_logprobs(&row, golden.top_k);
            let token = top[0].0;
            steps.push(Step { token, top });
            if i + 1 < n {
                row = model.forward(gpu, &[token], c.prompt.len() + i)?;
            }
        }
        all.push(steps);
    }
    Ok(all)
}

/// One row of `parity.csv`: a golden prompt and how it compared.
#[derive(Clone, Debug, Serialize)]
pub struct ParityRow {
    pub model: String,
    pub dtype: String,
    pub hf_dtype: String,
    pub case: usize,
    pub prompt_len: usize,
    pub steps: usize,
    pub matched: usize,
    pub ours_in_hf: Option<usize>,
    pub hf_in_ours: Option<usize>,
    pub max_logprob_diff: f64,
    pub pass: bool,
}

/// Our greedy runs against every golden case, one row each.
pub fn rows(golden: &Golden, ours: &[Vec<Step>], model: &str, dtype: &str) -> Vec<ParityRow> {
    golden
        .cases
        .iter()
        .zip(ours)
        .enumerate()
        .map(|(i, (c, o))| {
            let r = compare(o, &c.steps);
            ParityRow {
                model: model.to_string(),
                dtype: dtype.to_string(),
                hf_dtype: golden.dtype.clone(),
                case: i,
                prompt_len: c.prompt.len(),
                steps: r.steps,
                matched: r.matched,
                ours_in_hf: r.ours_in_hf,
                hf_in_ours: r.hf_in_ours,
                max_logprob_diff: r.max_logprob_diff,
                pass: r.pass,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(token: u32, others: &[u32]) -> Step {
        let mut top = vec![(token, -1.0)];
        top.extend(
            others
                .iter()
                .enumerate()
                .map(|(i, &t)| (t, -2.0 - i as f64)),
        );
        Step { token, top }
    }

    #[test]
    fn identical_streams_pass_with_no_divergence() {
        let a = vec![step(1, &[2, 3]), step(4, &[5, 6])];
        let r = compare(&a, &a);
        assert!(r.pass);
        assert_eq!((r.matched, r.steps), (2, 2));
        assert_eq!(r.max_logprob_diff, 0.0);
    }

    #[test]
    fn a_divergence_inside_both_top_k_passes() {
        let ours = vec![step(1, &[2, 3]), step(4, &[5, 6]), step(9, &[9, 9])];
        let hf = vec![step(1, &[2, 3]), step(5, &[4, 6]), step(0, &[0, 0])];
        let r = compare(&ours, &hf);
        assert!(r.pass, "{r:?}");
        assert_eq!(r.matched, 1);
        assert_eq!((r.ours_in_hf, r.hf_in_ours), (Some(1), Some(1)));
    }

    #[test]
    fn a_token_outside_the_other_top_k_fails() {
        // Sabotage: HF's token is not among ours at the first difference.
        let ours = vec![step(1, &[2, 3]), step(4, &[6, 7])];
        let hf = vec![step(1, &[2, 3]), step(5, &[4, 6])];
        let r = compare(&ours, &hf);
        assert!(!r.pass);
        assert_eq!((r.ours_in_hf, r.hf_in_ours), (Some(1), None));
    }

    #[test]
    fn streams_of_different_lengths_fail() {
        let a = vec![step(1, &[2, 3]), step(4, &[5, 6])];
        assert!(!compare(&a[..1], &a).pass);
    }

    #[test]
    fn logprob_gap_of_matched_steps_is_reported() {
        let ours = vec![Step {
            token: 3,
            top: vec![(3, -0.5), (1, -2.0)],
        }];
        let hf = vec![Step {
            token: 3,
            top: vec![(3, -0.25), (1, -2.0)],
        }];
        let r = compare(&ours, &hf);
        assert!(r.pass);
        assert!((r.max_logprob_diff - 0.25).abs() < 1e-12);
    }

    #[test]
    fn top_logprobs_ranks_and_normalizes() {
        let logits = [0.0f32, 2.0, f32::NAN, 1.0, 2.0];
        let t = top_logprobs(&logits, 3);
        let ids: Vec<u32> = t.iter().map(|e| e.0).collect();
        // Ties go to the lower id; NaN ranks last.
        assert_eq!(ids, vec![1, 4, 3]);
        let z: f64 = [0.0f64, 2.0, 1.0, 2.0].iter().map(|x| x.exp()).sum();
        assert!((t[0].1 - (2.0 - z.ln())).abs() < 1e-12);
        assert!(t[0].1 >= t[1].1 && t[1].1 >= t[2].1);
    }

    #[test]
    fn golden_shape_is_checked() {
        let ok = r#"{"schema_version":1,"model":"m","dtype":"bfloat16","top_k":2,
            "cases":[{"prompt":[1,2],"steps":[{"token":3,"top":[[3,-0.1],[4,-2.0]]}]}]}"#;
        assert!(Golden::from_json(ok).is_ok());
        let wrong_first = ok.replace("[[3,-0.1],[4,-2.0]]", "[[4,-0.1],[3,-2.0]]");
        assert!(Golden::from_json(&wrong_first)
            .unwrap_err()
            .contains("not the first"));
        let short = ok.replace("[[3,-0.1],[4,-2.0]]", "[[3,-0.1]]");
        assert!(Golden::from_json(&short).is_err());
        let schema = ok.replace("\"schema_version\":1", "\"schema_version\":2");
        assert!(Golden::from_json(&schema)
            .unwrap_err()
            .contains("schema_version"));
    }
}
