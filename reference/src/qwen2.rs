//! A whole Qwen2 decoder (`Qwen2ForCausalLM`) forward pass over one sequence,
//! built from the other references. It is the definition the engine's GPU
//! forward is checked against, and is itself checked against Hugging Face
//! transformers' f32 logits (`tests/hf_parity.rs` at the workspace root).
//!
//! Weights keep Hugging Face's tensor names and layouts: every projection
//! weight is `[out, in]` and applied as `y = x W^T (+ b)`. Per layer, with
//! `x: [len, hidden]`:
//!
//! ```text
//! h   = rmsnorm(x, input_layernorm)
//! q   = h Wq^T + bq  -> [len, heads, head_dim]      (head-major, as HF's view)
//! k   = h Wk^T + bk  -> [len, kv_heads, head_dim]
//! v   = h Wv^T + bv  -> [len, kv_heads, head_dim]
//! q,k = rope_neox(q, k, positions 0..len, theta)
//! a_t = attention(q_t, k_0..=t, v_0..=t, scale 1/sqrt(head_dim))   (causal, GQA)
//! x   = x + a Wo^T                                   (o_proj has no bias)
//! h   = rmsnorm(x, post_attention_layernorm)
//! x   = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
//! ```
//!
//! then `logits = rmsnorm(x, model.norm) W_lm^T` with `W_lm` =
//! `model.embed_tokens.weight` when the embeddings are tied. All `f64`, no
//! rounding, no KV cache: [`Qwen2Weights::greedy`] recomputes the whole
//! prefix for every new token.

use ndarray::{concatenate, s, Array1, Array2, Array3, ArrayView1, ArrayView2, Axis};

use crate::paged_attention::contiguous_decode;
use crate::rmsnorm::rmsnorm;
use crate::rope::rope_neox;
use crate::silu_mul::silu_mul;
use crate::ShapeError;

const LOAD_OP: &str = "qwen2_weights";
const FORWARD_OP: &str = "qwen2_forward";

/// The model shape and constants the forward needs (a plain subset of HF's
/// `Qwen2Config`).
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2RefConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads % kv_heads == 0`.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// `rms_norm_eps`.
    pub eps: f64,
    /// `rope_theta`.
    pub theta: f64,
    /// `tie_word_embeddings`: the LM head is `model.embed_tokens.weight`.
    pub tie: bool,
}

/// One decoder layer's weights, `[out, in]` for every projection.
#[derive(Clone, Debug)]
pub struct Qwen2LayerWeights {
    pub input_layernorm: Array1<f64>,          // [hidden]
    pub q_proj: Array2<f64>,                   // [heads * head_dim, hidden]
    pub q_bias: Array1<f64>,                   // [heads * head_dim]
    pub k_proj: Array2<f64>,                   // [kv_heads * head_dim, hidden]
    pub k_bias: Array1<f64>,                   // [kv_heads * head_dim]
    pub v_proj: Array2<f64>,                   // [kv_heads * head_dim, hidden]
    pub v_bias: Array1<f64>,                   // [kv_heads * head_dim]
    pub o_proj: Array2<f64>,                   // [hidden, heads * head_dim]
    pub post_attention_layernorm: Array1<f64>, // [hidden]
    pub gate_proj: Array2<f64>,                // [intermediate, hidden]
    pub up_proj: Array2<f64>,                  // [intermediate, hidden]
    pub down_proj: Array2<f64>,                // [hidden, intermediate]
}

/// A whole model's weights.
#[derive(Clone, Debug)]
pub struct Qwen2Weights {
    pub cfg: Qwen2RefConfig,
    pub embed_tokens: Array2<f64>, // [vocab, hidden]
    pub layers: Vec<Qwen2LayerWeights>,
    pub norm: Array1<f64>, // [hidden]
    /// `lm_head.weight` [vocab, hidden]; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Array2<f64>>,
}

/// `ShapeError` names its argument with a `&'static str`; tensor names are
/// built at run time, so a name is leaked once, only on the error path.
fn leak(name: &str) -> &'static str {
    Box::leak(name.to_string().into_boxed_str())
}

fn invalid_cfg(requirement: String) -> ShapeError {
    ShapeError::Invalid {
        op: LOAD_OP,
        arg: "cfg",
        actual: vec![],
        requirement,
    }
}

fn check_cfg(c: &Qwen2RefConfig) -> Result<(), ShapeError> {
    let dims = [
        ("hidden", c.hidden),
        ("intermediate", c.intermediate),
        ("heads", c.heads),
        ("kv_heads", c.kv_heads),
        ("head_dim", c.head_dim),
        ("vocab", c.vocab),
    ];
    if let Some((name, _)) = dims.iter().find(|(_, d)| *d == 0) {
        return Err(invalid_cfg(format!("{name} >= 1")));
    }
    if c.heads % c.kv_heads != 0 {
        return Err(invalid_cfg(format!(
            "heads ({}) a multiple of kv_heads ({})",
            c.heads, c.kv_heads
        )));
    }
    if c.head_dim % 2 != 0 {
        return Err(invalid_cfg(format!(
            "an even head_dim (got {})",
            c.head_dim
        )));
    }
    if !(c.eps >= 0.0 && c.theta > 0.0) {
        return Err(invalid_cfg(format!(
            "eps >= 0 and theta > 0 (got eps {}, theta {})",
            c.eps, c.theta
        )));
    }
    Ok(())
}

/// Fetches `name` through `get` and checks it has exactly `shape`.
fn fetch(
    get: &impl Fn(&str) -> Option<(Vec<usize>, Vec<f64>)>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f64>, ShapeError> {
    let Some((actual, data)) = get(name) else {
        return Err(ShapeError::Invalid {
            op: LOAD_OP,
            arg: leak(name),
            actual: vec![],
            requirement: format!("a tensor of shape {shape:?}, but it is missing"),
        });
    };
    if actual != shape {
        return Err(ShapeError::Mismatch {
            op: LOAD_OP,
            arg: leak(name),
            expected: shape.to_vec(),
            actual,
        });
    }
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(ShapeError::Invalid {
            op: LOAD_OP,
            arg: leak(name),
            actual,
            requirement: format!("{n} values, but {} were given", data.len()),
        });
    }
    Ok(data)
}

fn vector(
    get: &impl Fn(&str) -> Option<(Vec<usize>, Vec<f64>)>,
    name: &str,
    len: usize,
) -> Result<Array1<f64>, ShapeError> {
    Ok(Array1::from_vec(fetch(get, name, &[len])?))
}

fn matrix(
    get: &impl Fn(&str) -> Option<(Vec<usize>, Vec<f64>)>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Array2<f64>, ShapeError> {
    let data = fetch(get, name, &[rows, cols])?;
    Ok(Array2::from_shape_vec((rows, cols), data).expect("length checked by fetch"))
}

/// `x W^T + b` for `x: [tokens, in]`, `w: [out, in]`, `b: [out]`.
fn linear(x: ArrayView2<f64>, w: ArrayView2<f64>, b: Option<ArrayView1<f64>>) -> Array2<f64> {
    let mut y = x.dot(&w.t()); // [tokens, out]
    if let Some(b) = b {
        y += &b;
    }
    y
}

/// Causal GQA attention over one sequence: query `t` attends to keys `0..=t`.
/// `q: [len, heads, d]`, `k, v: [len, kv_heads, d]` -> `[len, heads * d]`.
fn causal_attention(
    q: &Array3<f64>,
    k: &Array3<f64>,
    v: &Array3<f64>,
) -> Result<Array2<f64>, ShapeError> {
    let (len, heads, head_dim) = q.dim();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = Array2::zeros((len, heads * head_dim)); // [len, heads * head_dim]
    for t in 0..len {
        let o = contiguous_decode(
            q.slice(s![t, .., ..]),
            k.slice(s![..=t, .., ..]),
            v.slice(s![..=t, .., ..]),
            scale,
        )?; // [heads, head_dim]
        let flat = o
            .to_shape(heads * head_dim)
            .expect("a fresh standard-layout array");
        out.row_mut(t).assign(&flat);
    }
    Ok(out)
}

impl Qwen2Weights {
    /// Builds the model from HF-named tensors: `get(name)` returns the
    /// tensor's shape and its values in row-major order, or `None` when the
    /// checkpoint lacks it. Every tensor is checked against `cfg`; the error
    /// names the first one that is missing or has the wrong shape.
    /// `lm_head.weight` is read only when `cfg.tie` is false.
    pub fn from_tensors(
        cfg: &Qwen2RefConfig,
        get: impl Fn(&str) -> Option<(Vec<usize>, Vec<f64>)>,
    ) -> Result<Self, ShapeError> {
        check_cfg(cfg)?;
        let c = cfg;
        let (h, i) = (c.hidden, c.intermediate);
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let embed_tokens = matrix(&get, "model.embed_tokens.weight", c.vocab, h)?;
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let p = format!("model.layers.{l}.");
            let n = |suffix: &str| format!("{p}{suffix}");
            layers.push(Qwen2LayerWeights {
                input_layernorm: vector(&get, &n("input_layernorm.weight"), h)?,
                q_proj: matrix(&get, &n("self_attn.q_proj.weight"), qd, h)?,
                q_bias: vector(&get, &n("self_attn.q_proj.bias"), qd)?,
                k_proj: matrix(&get, &n("self_attn.k_proj.weight"), kvd, h)?,
                k_bias: vector(&get, &n("self_attn.k_proj.bias"), kvd)?,
                v_proj: matrix(&get, &n("self_attn.v_proj.weight"), kvd, h)?,
                v_bias: vector(&get, &n("self_attn.v_proj.bias"), kvd)?,
                o_proj: matrix(&get, &n("self_attn.o_proj.weight"), h, qd)?,
                post_attention_layernorm: vector(&get, &n("post_attention_layernorm.weight"), h)?,
                gate_proj: matrix(&get, &n("mlp.gate_proj.weight"), i, h)?,
                up_proj: matrix(&get, &n("mlp.up_proj.weight"), i, h)?,
                down_proj: matrix(&get, &n("mlp.down_proj.weight"), h, i)?,
            });
        }
        let norm = vector(&get, "model.norm.weight", h)?;
        let lm_head = if c.tie {
            None
        } else {
            Some(matrix(&get, "lm_head.weight", c.vocab, h)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The LM head `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> ArrayView2<'_, f64> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).view()
    }

    /// Logits `[len, vocab]` for every position of `tokens` (positions
    /// `0..len`, causal). An empty sequence gives `[0, vocab]`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Array2<f64>, ShapeError> {
        let c = &self.cfg;
        let len = tokens.len();
        if let Some((t, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= c.vocab)
        {
            return Err(ShapeError::OutOfRange {
                op: FORWARD_OP,
                arg: "tokens",
                index: vec![t],
                value: i64::from(id),
                expected: format!("a token id in [0, {})", c.vocab),
            });
        }
        let positions: Vec<i32> = (0..len)
            .map(|p| i32::try_from(p).expect("sequence length fits i32"))
            .collect();

        let mut x = Array2::zeros((len, c.hidden)); // [len, hidden]
        for (t, &id) in tokens.iter().enumerate() {
            x.row_mut(t).assign(&self.embed_tokens.row(id as usize));
        }

        for w in &self.layers {
            // Attention block.
            let h = rmsnorm(x.view(), w.input_layernorm.view(), c.eps)?;
            let q = linear(h.view(), w.q_proj.view(), Some(w.q_bias.view()));
            let k = linear(h.view(), w.k_proj.view(), Some(w.k_bias.view()));
            let v = linear(h.view(), w.v_proj.view(), Some(w.v_bias.view()));
            let q = q
                .into_shape_with_order((len, c.heads, c.head_dim))
                .expect("[len, heads * head_dim] is contiguous"); // [len, heads, head_dim]
            let k = k
                .into_shape_with_order((len, c.kv_heads, c.head_dim))
                .expect("[len, kv_heads * head_dim] is contiguous"); // [len, kv_heads, head_dim]
            let v = v
                .into_shape_with_order((len, c.kv_heads, c.head_dim))
                .expect("[len, kv_heads * head_dim] is contiguous"); // [len, kv_heads, head_dim]
            let q = rope_neox(q.view(), &positions, c.theta)?;
            let k = rope_neox(k.view(), &positions, c.theta)?;
            let a = causal_attention(&q, &k, &v)?; // [len, heads * head_dim]
            x += &linear(a.view(), w.o_proj.view(), None);

            // MLP block.
            let h = rmsnorm(x.view(), w.post_attention_layernorm.view(), c.eps)?;
            let gate = linear(h.view(), w.gate_proj.view(), None); // [len, intermediate]
            let up = linear(h.view(), w.up_proj.view(), None); // [len, intermediate]
            let gate_up = concatenate(Axis(1), &[gate.view(), up.view()])
                .expect("gate and up have the same shape"); // [len, 2 * intermediate]
            let act = silu_mul(gate_up.view())?; // [len, intermediate]
            x += &linear(act.view(), w.down_proj.view(), None);
        }

        let h = rmsnorm(x.view(), self.norm.view(), c.eps)?;
        Ok(linear(h.view(), self.lm_head(), None)) // [len, vocab]
    }

    /// Greedy decoding: appends the argmax token `n` times (the first index
    /// on ties, like `torch.argmax`) and returns the `n` new tokens. No stop
    /// token. The prompt must not be empty.
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>, ShapeError> {
        if prompt.is_empty() {
            return Err(ShapeError::Invalid {
                op: "qwen2_greedy",
                arg: "prompt",
                actual: vec![0],
                requirement: "at least one token".into(),
            });
        }
        let mut seq = prompt.to_vec();
        for _ in 0..n {
            let logits = self.forward(&seq)?;
            let last = logits.row(seq.len() - 1);
            let best = argmax(last);
            seq.push(u32::try_from(best).expect("vocab fits u32"));
        }
        Ok(seq.split_off(prompt.len()))
    }
}

/// Index of the largest value, the first one on ties.
pub fn argmax(row: ArrayView1<f64>) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, random, rng};
    use std::collections::HashMap;

    fn cfg(heads: usize, kv_heads: usize, tie: bool) -> Qwen2RefConfig {
        Qwen2RefConfig {
            hidden: 16,
            intermediate: 24,
            layers: 2,
            heads,
            kv_heads,
            head_dim: 4,
            vocab: 32,
            eps: 1e-6,
            theta: 1e4,
            tie,
        }
    }

    type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

    fn random_tensors(c: &Qwen2RefConfig, seed: u64) -> Tensors {
        let mut r = rng(seed);
        let mut t = Tensors::new();
        let mut put = |name: String, shape: Vec<usize>| {
            let n = shape.iter().product::<usize>();
            let data = random(&mut r, n).to_vec();
            t.insert(name, (shape, data));
        };
        let (h, i) = (c.hidden, c.intermediate);
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        put("model.embed_tokens.weight".into(), vec![c.vocab, h]);
        for l in 0..c.layers {
            let p = format!("model.layers.{l}.");
            put(format!("{p}input_layernorm.weight"), vec![h]);
            put(format!("{p}self_attn.q_proj.weight"), vec![qd, h]);
            put(format!("{p}self_attn.q_proj.bias"), vec![qd]);
            put(format!("{p}self_attn.k_proj.weight"), vec![kvd, h]);
            put(format!("{p}self_attn.k_proj.bias"), vec![kvd]);
            put(format!("{p}self_attn.v_proj.weight"), vec![kvd, h]);
            put(format!("{p}self_attn.v_proj.bias"), vec![kvd]);
            put(format!("{p}self_attn.o_proj.weight"), vec![h, qd]);
            put(format!("{p}post_attention_layernorm.weight"), vec![h]);
            put(format!("{p}mlp.gate_proj.weight"), vec![i, h]);
            put(format!("{p}mlp.up_proj.weight"), vec![i, h]);
            put(format!("{p}mlp.down_proj.weight"), vec![h, i]);
        }
        put("model.norm.weight".into(), vec![h]);
        if !c.tie {
            put("lm_head.weight".into(), vec![c.vocab, h]);
        }
        t
    }

    fn build(c: &Qwen2RefConfig, t: &Tensors) -> Result<Qwen2Weights, ShapeError> {
        Qwen2Weights::from_tensors(c, |n| t.get(n).cloned())
    }

    #[test]
    fn missing_tensor_is_named() {
        let c = cfg(4, 2, true);
        let mut t = random_tensors(&c, 1);
        t.remove("model.layers.1.self_attn.k_proj.bias");
        let err = build(&c, &t).unwrap_err();
        assert_eq!(err.arg(), "model.layers.1.self_attn.k_proj.bias");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn wrong_shape_is_named() {
        let c = cfg(4, 2, true);
        let mut t = random_tensors(&c, 1);
        t.insert(
            "model.layers.0.mlp.down_proj.weight".into(),
            (vec![24, 16], vec![0.0; 24 * 16]),
        );
        let err = build(&c, &t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "qwen2_weights: model.layers.0.mlp.down_proj.weight has shape [24, 16], expected [16, 24]"
        );
    }

    #[test]
    fn untied_needs_lm_head_and_bad_cfg_is_rejected() {
        let c = cfg(4, 2, false);
        let mut t = random_tensors(&c, 1);
        t.remove("lm_head.weight");
        assert_eq!(build(&c, &t).unwrap_err().arg(), "lm_head.weight");
        let err = build(&cfg(4, 3, true), &t).unwrap_err();
        assert_eq!(err.arg(), "cfg");
    }

    #[test]
    fn out_of_range_token_and_empty_prompt() {
        let c = cfg(4, 2, true);
        let m = build(&c, &random_tensors(&c, 2)).unwrap();
        let err = m.forward(&[1, 32]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "qwen2_forward: tokens[1] = 32 is out of range, expected a token id in [0, 32)"
        );
        assert_eq!(m.forward(&[]).unwrap().dim(), (0, 32));
        assert!(m.greedy(&[], 3).is_err());
    }

    /// Causality: a prefix's logits are the first rows of the full sequence's.
    #[test]
    fn prefix_logits_are_causal() {
        let c = cfg(4, 2, true);
        let m = build(&c, &random_tensors(&c, 3)).unwrap();
        let seq = [3, 1, 4, 1, 5, 9, 2, 6];
        let full = m.forward(&seq).unwrap();
        for n in 1..seq.len() {
            let part = m.forward(&seq[..n]).unwrap();
            assert_close(&part, &full.slice(s![..n, ..]), 1e-12);
        }
    }

    /// Tied embeddings equal an untied model whose lm_head is the embedding.
    #[test]
    fn tied_equals_explicit_lm_head() {
        let tied = cfg(4, 2, true);
        let t = random_tensors(&tied, 4);
        let mut u = t.clone();
        u.insert(
            "lm_head.weight".into(),
            t["model.embed_tokens.weight"].clone(),
        );
        let a = build(&tied, &t).unwrap().forward(&[7, 8, 9]).unwrap();
        let b = build(&cfg(4, 2, false), &u)
            .unwrap()
            .forward(&[7, 8, 9])
            .unwrap();
        assert_close(&a, &b, 0.0);
    }

    /// GQA: kv_heads = 2 equals full multi-head attention (kv_heads = heads)
    /// with every kv head's k/v rows repeated for its group.
    #[test]
    fn gqa_equals_repeated_kv_heads() {
        let gqa = cfg(4, 2, true);
        let t = random_tensors(&gqa, 5);
        let mha = cfg(4, 4, true);
        let mut u = t.clone();
        let d = gqa.head_dim;
        for l in 0..gqa.layers {
            for which in ["k_proj", "v_proj"] {
                let wn = format!("model.layers.{l}.self_attn.{which}.weight");
                let bn = format!("model.layers.{l}.self_attn.{which}.bias");
                let (_, w) = &t[&wn];
                let (_, b) = &t[&bn];
                let (mut w2, mut b2) = (Vec::new(), Vec::new());
                for h in 0..mha.heads {
                    let kvh = h / (gqa.heads / gqa.kv_heads);
                    w2.extend_from_slice(&w[kvh * d * gqa.hidden..(kvh + 1) * d * gqa.hidden]);
                    b2.extend_from_slice(&b[kvh * d..(kvh + 1) * d]);
                }
                u.insert(wn, (vec![mha.heads * d, gqa.hidden], w2));
                u.insert(bn, (vec![mha.heads * d], b2));
            }
        }
        let seq = [0, 5, 10, 15, 20, 25];
        let a = build(&gqa, &t).unwrap().forward(&seq).unwrap();
        let b = build(&mha, &u).unwrap().forward(&seq).unwrap();
        assert_close(&a, &b, 1e-12);
    }

    /// Greedy picks each step's argmax of the full forward.
    #[test]
    fn greedy_follows_argmax() {
        let c = cfg(4, 2, true);
        let m = build(&c, &random_tensors(&c, 6)).unwrap();
        let prompt = [2, 7];
        let new = m.greedy(&prompt, 4).unwrap();
        assert_eq!(new.len(), 4);
        let mut seq = prompt.to_vec();
        for &tok in &new {
            let logits = m.forward(&seq).unwrap();
            assert_eq!(tok as usize, argmax(logits.row(seq.len() - 1)));
            seq.push(tok);
        }
        assert_eq!(argmax(ndarray::array![1.0, 3.0, 3.0, 0.0].view()), 1);
    }
}
