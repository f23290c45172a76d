//! The Qwen2 forward on the GPU, assembled from the workbench's kernels and
//! cuBLAS, over a shared paged KV pool: one call runs any mix of sequences'
//! tokens (a prefill batch or a decode batch from the scheduler). Checked
//! against Hugging Face's logits in `tests/hf_parity.rs`.
//!
//! Per layer, with the residual stream kept as HF rounds it:
//!   hn = RMSNorm(residual)                         (rmsnorm / fused_add_rmsnorm)
//!   q|k|v = hn·[Wq; Wk; Wv]^T + b, split          (one GEMM, split_qkv_bias)
//!   q = RoPE(q); RoPE(k), v -> paged cache in one pass      (rope_kv_store)
//!   attn = causal GQA attention of q over the cache          (paged_attention)
//!   residual += attn·Wo^T; hn = RMSNorm(residual)            (fused_add_rmsnorm)
//!   residual += down(silu(hn·[Wg; Wu]^T))          (one GEMM for gate|up, silu_mul)
//! then the final norm, the LM head only on the rows whose next token is
//! wanted (`gather_rows`), and sampling on the GPU (`sample_rows`), so a
//! step copies token ids back, never logits.
//!
//! Attention runs one "row" per query token with its sequence's block table
//! and its own causal length (position + 1): a decode batch is one row per
//! sequence; a prefill batch is correct the same way, but pays the decode
//! kernel's per-row cost until the prefill kernel (issue #4) takes over.
//!
//! Every activation buffer is allocated once at load for [`ModelLimits`]
//! (the scheduler's token and sequence caps), so a step allocates no GPU
//! memory: inputs are copied into the preallocated index buffers.

use super::config::Qwen2Config;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaView, CudaViewMut};
use kernels::linear_lt::LtLinear;
use kernels::paged_attention::{FusedQkv, PagedAttentionDims};
use kernels::prefill_attention::PrefillAttentionDims;
use kernels::rmsnorm::RmsNormDims;
use kernels::rope::RopeTable;
use kernels::rope_kv_store::{QkvRopeKvStoreArgs, RopeKvStoreDims};
use kernels::{Gpu, KernelError, Storage};
use std::collections::HashMap;
use thiserror::Error;

pub const BLOCK_SIZE: usize = 16;

/// The breakdown's label of decode attention (with v3f it includes the
/// fused bias, RoPE and store of the new token).
pub const DECODE_ATTENTION: &str = "paged_attention";

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("tensor `{0}` missing from the checkpoint")]
    Missing(String),
    #[error("tensor `{name}` has {actual} values, expected {expected}")]
    Size {
        name: String,
        expected: usize,
        actual: usize,
    },
    #[error("token id {token} at position {index} is outside the vocabulary ({vocab})")]
    Token {
        token: u32,
        index: usize,
        vocab: usize,
    },
    #[error("positions {start}..{end} exceed the model's KV capacity of {capacity} tokens")]
    Capacity {
        start: usize,
        end: usize,
        capacity: usize,
    },
    #[error("a step of {got} {what} exceeds the limit of {limit} it was loaded for")]
    StepTooBig {
        what: &'static str,
        got: usize,
        limit: usize,
    },
    #[error("step inputs disagree: {0}")]
    Inputs(String),
    #[error("empty input")]
    Empty,
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// What the workspace and the KV pool are sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// KV-cache blocks of [`BLOCK_SIZE`] tokens, shared by all sequences.
    pub num_blocks: usize,
    /// Most tokens in one step.
    pub max_tokens: usize,
    /// Most rows sampled in one step (sequences in a batch).
    pub max_seqs: usize,
    /// Longest sequence: positions (RoPE table) and block-table width.
    pub max_model_len: usize,
}

impl ModelLimits {
    fn max_blocks_per_seq(&self) -> usize {
        self.max_model_len.div_ceil(BLOCK_SIZE)
    }
}

/// One step's host-side inputs. Attention runs one row per token.
pub struct StepInput<'a> {
    /// [t] token ids.
    pub tokens: &'a [u32],
    /// [t] positions.
    pub positions: &'a [i32],
    /// [t] cache slots (block * BLOCK_SIZE + offset) for the tokens' K/V.
    pub slots: &'a [i64],
    /// [t, mbps] block table of each token's sequence, padded with 0.
    pub tables: &'a [i32],
    pub mbps: usize,
    /// [t] keys each token attends to (its position + 1).
    pub lens: &'a [i32],
    /// [n] token indices whose logits are wanted (each sequence's last).
    pub last: &'a [i32],
    /// The same tokens grouped by sequence, for the prefill attention
    /// kernel; `None` runs attention one row per token (decode steps).
    pub seqs: Option<SeqInput<'a>>,
}

/// Per-sequence view of a step's tokens: sequence b owns tokens
/// cu_seqlens[b]..cu_seqlens[b+1], which are the last ones of its kv_lens[b]
/// tokens (the cache holds its earlier ones).
pub struct SeqInput<'a> {
    /// [b + 1]
    pub cu_seqlens: &'a [i32],
    /// [b]
    pub kv_lens: &'a [i32],
    /// [b, mbps] block tables (same width as the per-token tables).
    pub tables: &'a [i32],
    pub max_q_len: usize,
}

struct Layer<T> {
    in_norm: CudaSlice<T>,
    post_norm: CudaSlice<T>,
    /// [q_heads * d + 2 * kv_heads * d, hidden]: q, k, v rows fused at load,
    /// so one GEMM computes all three projections.
    qkv_w: CudaSlice<T>,
    /// [q_heads * d + 2 * kv_heads * d]
    qkv_b: CudaSlice<T>,
    o_w: CudaSlice<T>,
    /// [2 * intermediate, hidden]: gate rows then up rows, fused at load so
    /// one GEMM writes silu_mul's [t, gate | up] layout.
    gate_up_w: CudaSlice<T>,
    down_w: CudaSlice<T>,
    /// [num_blocks, BLOCK_SIZE, kv_heads, head_dim]
    k_cache: CudaSlice<T>,
    v_cache: CudaSlice<T>,
}

/// Activations and step inputs, sized once for [`ModelLimits`].
struct Workspace<T> {
    residual: CudaSlice<T>,     // [T, h]
    hn: CudaSlice<T>,           // [T, h]
    qkv: CudaSlice<T>,          // [T, q_heads * d + 2 * kv_heads * d]: fused GEMM output
    q: CudaSlice<T>,            // [T, q_heads * d]
    attn: CudaSlice<T>,         // [T, q_heads * d]
    proj: CudaSlice<T>,         // [T, h]: o_proj, then down_proj output
    gu: CudaSlice<T>,           // [T, 2I]
    act: CudaSlice<T>,          // [T, I]
    last_h: CudaSlice<T>,       // [S, h]
    logits: CudaSlice<T>,       // [S, vocab]
    ids: CudaSlice<i32>,        // [T]
    pos: CudaSlice<i32>,        // [T]
    slots: CudaSlice<i64>,      // [T]
    tables: CudaSlice<i32>,     // [T, mbps]
    lens: CudaSlice<i32>,       // [T]
    last: CudaSlice<i32>,       // [S]
    cu_seqlens: CudaSlice<i32>, // [S + 1]
    kv_lens: CudaSlice<i32>,    // [S]
    seq_tables: CudaSlice<i32>, // [S, mbps]
    inv_temp: CudaSlice<f32>,
    seeds: CudaSlice<u64>,
    sampled: CudaSlice<i32>,
}

pub struct GpuModel<T> {
    cfg: Qwen2Config,
    limits: ModelLimits,
    /// [vocab, hidden]; also the LM head when tied.
    embed: CudaSlice<T>,
    lm_head: Option<CudaSlice<T>>,
    final_norm: CudaSlice<T>,
    layers: Vec<Layer<T>>,
    rope: RopeTable,
    ws: Workspace<T>,
    /// Logits rows of the last step, for [`GpuModel::logits_host`].
    last_rows: usize,
    /// Decode graphs by padded batch size, with the scratch generation
    /// they were captured under (a reallocated scratch invalidates them).
    graphs: HashMap<usize, (CudaGraph, u64)>,
    /// Use the prefill attention kernel for steps that give [`SeqInput`]
    /// (bf16/f16 with a head_dim it is compiled for); else one decode row
    /// per token.
    pub prefill_kernel: bool,
    /// Cap on tokens per split of decode attention (0: the launcher's own
    /// plan, the default). Decode batches are ragged, so without a cap the
    /// longest sequence of a batch runs as one block and finishes last; but
    /// on the e2e workload the merge a cap adds cost more than the balance
    /// gained (CHALLENGES #12), so it stays off unless asked for.
    pub decode_split_tokens: usize,
    /// Decode attention reads the fused projection itself (v3f: bias, RoPE
    /// and the new token's store in its prologue) instead of a separate
    /// `qkv_rope_kv_store` launch. Bit-identical either way; on by default
    /// where v3f exists (bf16/f16 and a compiled head_dim).
    pub fused_decode_qkv: bool,
    /// The paged_attention variant decode runs (default: the production one).
    pub decode_attention: &'static str,
    /// The prefill_attention variant prefill runs (default: the production one).
    pub prefill_attention: &'static str,
    /// The linear layers' GEMM path (see [`GemmBackend`]); set with
    /// [`GpuModel::set_gemm`]. Declared after `graphs`, so it is dropped
    /// after the graphs that captured its workspace.
    lt: Option<LtLinear>,
    /// Decode's o_proj and down GEMMs split K this many ways (0 or 1: no
    /// split), as one strided-batched cuBLAS GEMM writing f32 partials
    /// that the following fused add + RMSNorm sums (`kernels::linear::
    /// linear_split_k`); set with [`GpuModel::set_split_k`].
    split_k: usize,
    /// [split_k, max_seqs, h] f32: those partials.
    partials: Option<CudaSlice<f32>>,
}

/// How the linear layers run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmBackend {
    /// cublasGemmEx with cuBLAS's own choice of algorithm (the default:
    /// on the H200 at batch 256 its picks were as fast as the tuned ones).
    #[default]
    Cublas,
    /// cuBLASLt with, per shape of up to 512 tokens (decode batches), the
    /// fastest of up to 16 heuristic candidates timed once
    /// (`kernels::linear_lt`); larger shapes take the heuristic's first.
    LtTuned,
}

impl std::str::FromStr for GemmBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cublas" => Ok(Self::Cublas),
            "lt-tuned" => Ok(Self::LtTuned),
            _ => Err(format!("unknown GEMM backend `{s}` (cublas, lt-tuned)")),
        }
    }
}

/// One linear layer through the model's GEMM path.
#[allow(clippy::too_many_arguments)]
fn lin<T: Storage>(
    lt: &mut Option<LtLinear>,
    gpu: &Gpu,
    y: &mut CudaViewMut<T>,
    ldy: usize,
    x: &CudaView<T>,
    w: &CudaView<T>,
    tokens: usize,
    in_features: usize,
    out_features: usize,
) -> Result<(), KernelError>
where
    CudaBlas: Gemm<T>,
{
    match lt {
        Some(l) => l.linear(gpu, y, ldy, x, w, tokens, in_features, out_features),
        None => kernels::linear::linear(gpu, y, ldy, x, w, tokens, in_features, out_features),
    }
}

fn upload<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, v: &[T]) -> Result<CudaSlice<T>, ModelError> {
    Ok(gpu
        .stream()
        .clone_htod(v)
        .map_err(KernelError::driver("upload weights"))?)
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    n: usize,
) -> Result<CudaSlice<T>, ModelError> {
    Ok(gpu
        .stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(KernelError::driver("allocate model buffers"))?)
}

/// A projection back to the hidden size (o_proj, down): y [t, h] = x [t,
/// inp] · w^T into `proj`, or, given `partials`, split `splits` ways along K
/// into f32 partials [splits, t, h] for [`add_norm_after`] to sum.
#[allow(clippy::too_many_arguments)]
fn project_hidden<T: Storage>(
    lt: &mut Option<LtLinear>,
    gpu: &Gpu,
    partials: Option<&mut CudaSlice<f32>>,
    splits: usize,
    proj: &mut CudaSlice<T>,
    x: &CudaView<T>,
    w: &CudaSlice<T>,
    t: usize,
    inp: usize,
    h: usize,
) -> Result<(), KernelError>
where
    CudaBlas: Gemm<T>,
{
    let w = w.slice(..);
    match partials {
        Some(p) => {
            let mut p = p.slice_mut(..splits * t * h);
            kernels::linear::linear_split_k(gpu, &mut p, x, &w, t, inp, h, splits)
        }
        None => lin(lt, gpu, &mut proj.slice_mut(..t * h), h, x, &w, t, inp, h),
    }
}

/// residual += x (rounded to T); hn = RMSNorm(residual) * weight, on t rows,
/// with x what [`project_hidden`] left: `proj`, or `partials` [splits, t, h]
/// f32 summed in split order.
#[allow(clippy::too_many_arguments)]
fn add_norm_after<T: Storage>(
    gpu: &Gpu,
    hn: &mut CudaSlice<T>,
    residual: &mut CudaSlice<T>,
    proj: &CudaSlice<T>,
    partials: Option<&CudaSlice<f32>>,
    splits: usize,
    weight: &CudaSlice<T>,
    norm: RmsNormDims,
) -> Result<(), ModelError> {
    let n = norm.tokens * norm.hidden;
    let (mut hn, mut residual) = (hn.slice_mut(..n), residual.slice_mut(..n));
    let weight = weight.slice(..);
    match partials {
        Some(p) => kernels::rmsnorm::fused_add_rmsnorm_partials(
            gpu,
            &mut hn,
            &mut residual,
            &p.slice(..splits * n),
            splits,
            &weight,
            norm,
        )?,
        None => kernels::rmsnorm::fused_add_rmsnorm(
            gpu,
            &mut hn,
            &mut residual,
            &proj.slice(..n),
            &weight,
            norm,
            kernels::rmsnorm::PRODUCTION,
        )?,
    }
    Ok(())
}

/// Where the weights come from.
pub enum WeightSource<'a> {
    /// HF-named tensors as f32 values (a checkpoint, or a test's golden).
    Tensors(&'a dyn Fn(&str) -> Option<Vec<f32>>),
    /// Seeded random weights generated on the GPU (the presets): uniform
    /// with std 0.02 for matrices and embeddings (HF's initializer range),
    /// biases ±0.02, norm weights in [0.9, 1.1].
    Random { seed: u64 },
}

impl<T: Storage> GpuModel<T>
where
    CudaBlas: Gemm<T>,
{
    /// Load from a tensor source giving HF-named tensors as f32 values;
    /// `capacity` is the KV cache size in tokens (one sequence), and also the
    /// most tokens (and logits rows) of one call (the single-sequence API
    /// [`GpuModel::forward`] uses).
    pub fn load(
        gpu: &Gpu,
        cfg: &Qwen2Config,
        get: &dyn Fn(&str) -> Option<Vec<f32>>,
        capacity: usize,
    ) -> Result<Self, ModelError> {
        let limits = ModelLimits {
            num_blocks: capacity.div_ceil(BLOCK_SIZE).max(1),
            max_tokens: capacity.max(1),
            max_seqs: capacity.max(1),
            max_model_len: capacity.max(1),
        };
        Self::build(gpu, cfg, WeightSource::Tensors(get), limits)
    }

    /// Weights from `src`, KV pool and workspace for `limits`.
    pub fn build(
        gpu: &Gpu,
        cfg: &Qwen2Config,
        src: WeightSource<'_>,
        limits: ModelLimits,
    ) -> Result<Self, ModelError> {
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kd) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let mut counter = 0u64;
        // One tensor: from the source (checked size), or random on the GPU.
        let mut tensor = |parts: &[(&str, usize)],
                          kind: Init|
         -> Result<CudaSlice<T>, ModelError> {
            let total: usize = parts.iter().map(|(_, n)| n).sum();
            match &src {
                WeightSource::Tensors(get) => {
                    let mut host: Vec<T> = Vec::with_capacity(total);
                    for &(name, n) in parts {
                        let v = get(name).ok_or_else(|| ModelError::Missing(name.to_string()))?;
                        if v.len() != n {
                            return Err(ModelError::Size {
                                name: name.to_string(),
                                expected: n,
                                actual: v.len(),
                            });
                        }
                        host.extend(v.into_iter().map(|x| T::from_f64(x as f64)));
                    }
                    upload(gpu, &host)
                }
                WeightSource::Random { seed } => {
                    let mut buf = zeros::<T>(gpu, total)?;
                    counter += 1;
                    let (lo, hi) = kind.range();
                    kernels::util::fill_random(
                        gpu,
                        &mut buf.slice_mut(..),
                        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ counter,
                        lo,
                        hi,
                    )?;
                    Ok(buf)
                }
            }
        };
        let cache = limits.num_blocks * BLOCK_SIZE * kd;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let (qw, kw, vw) = (
                p("self_attn.q_proj.weight"),
                p("self_attn.k_proj.weight"),
                p("self_attn.v_proj.weight"),
            );
            let (qb, kb, vb) = (
                p("self_attn.q_proj.bias"),
                p("self_attn.k_proj.bias"),
                p("self_attn.v_proj.bias"),
            );
            layers.push(Layer {
                in_norm: tensor(&[(&p("input_layernorm.weight"), h)], Init::Norm)?,
                post_norm: tensor(&[(&p("post_attention_layernorm.weight"), h)], Init::Norm)?,
                qkv_w: tensor(&[(&qw, qd * h), (&kw, kd * h), (&vw, kd * h)], Init::Matrix)?,
                qkv_b: tensor(&[(&qb, qd), (&kb, kd), (&vb, kd)], Init::Bias)?,
                o_w: tensor(&[(&p("self_attn.o_proj.weight"), h * qd)], Init::Matrix)?,
                gate_up_w: tensor(
                    &[
                        (&p("mlp.gate_proj.weight"), i * h),
                        (&p("mlp.up_proj.weight"), i * h),
                    ],
                    Init::Matrix,
                )?,
                down_w: tensor(&[(&p("mlp.down_proj.weight"), h * i)], Init::Matrix)?,
                k_cache: zeros(gpu, cache)?,
                v_cache: zeros(gpu, cache)?,
            });
        }
        let embed = tensor(
            &[("model.embed_tokens.weight", cfg.vocab_size * h)],
            Init::Matrix,
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(tensor(
                &[("lm_head.weight", cfg.vocab_size * h)],
                Init::Matrix,
            )?)
        };
        let final_norm = tensor(&[("model.norm.weight", h)], Init::Norm)?;
        let (t, s) = (limits.max_tokens, limits.max_seqs);
        let ws = Workspace {
            residual: zeros(gpu, t * h)?,
            hn: zeros(gpu, t * h)?,
            qkv: zeros(gpu, t * (qd + 2 * kd))?,
            q: zeros(gpu, t * qd)?,
            attn: zeros(gpu, t * qd)?,
            proj: zeros(gpu, t * h)?,
            gu: zeros(gpu, t * 2 * i)?,
            act: zeros(gpu, t * i)?,
            last_h: zeros(gpu, s * h)?,
            logits: zeros(gpu, s * cfg.vocab_size)?,
            ids: zeros(gpu, t)?,
            pos: zeros(gpu, t)?,
            slots: zeros(gpu, t)?,
            tables: zeros(gpu, t * limits.max_blocks_per_seq())?,
            lens: zeros(gpu, t)?,
            last: zeros(gpu, s)?,
            cu_seqlens: zeros(gpu, s + 1)?,
            kv_lens: zeros(gpu, s)?,
            seq_tables: zeros(gpu, s * limits.max_blocks_per_seq())?,
            inv_temp: zeros(gpu, s)?,
            seeds: zeros(gpu, s)?,
            sampled: zeros(gpu, s)?,
        };
        Ok(GpuModel {
            embed,
            lm_head,
            final_norm,
            layers,
            rope: RopeTable::new(gpu, limits.max_model_len, d, cfg.rope_theta)?,
            ws,
            limits,
            last_rows: 0,
            graphs: HashMap::new(),
            lt: None,
            split_k: 0,
            partials: None,
            decode_split_tokens: 0,
            fused_decode_qkv: true,
            decode_attention: kernels::paged_attention::PRODUCTION,
            prefill_attention: kernels::prefill_attention::PRODUCTION,
            prefill_kernel: T::DTYPE != kernels::DType::F32
                && kernels::prefill_attention::HEAD_DIMS
                    .iter()
                    .any(|(hd, _)| *hd == d),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.cfg
    }

    pub fn limits(&self) -> ModelLimits {
        self.limits
    }

    /// Tokens one sequence can hold ([`GpuModel::forward`]'s API).
    pub fn capacity(&self) -> usize {
        (self.limits.num_blocks * BLOCK_SIZE)
            .min(self.limits.max_model_len)
            .min(self.limits.max_tokens)
    }

    /// Check a step's inputs against the limits; the token ids as i32.
    fn validate(&self, inp: &StepInput<'_>) -> Result<Vec<i32>, ModelError> {
        let c = &self.cfg;
        let t = inp.tokens.len();
        let n = inp.last.len();
        if t == 0 || n == 0 {
            return Err(ModelError::Empty);
        }
        let lim = self.limits;
        for (what, got, limit) in [
            ("tokens", t, lim.max_tokens),
            ("sampled rows", n, lim.max_seqs),
            ("block-table columns", inp.mbps, lim.max_blocks_per_seq()),
        ] {
            if got > limit {
                return Err(ModelError::StepTooBig { what, got, limit });
            }
        }
        if inp.positions.len() != t
            || inp.slots.len() != t
            || inp.lens.len() != t
            || inp.tables.len() != t * inp.mbps
        {
            return Err(ModelError::Inputs(format!(
                "{t} tokens but {} positions, {} slots, {} lengths, {} table entries for {} columns",
                inp.positions.len(),
                inp.slots.len(),
                inp.lens.len(),
                inp.tables.len(),
                inp.mbps
            )));
        }
        let vocab = c.vocab_size;
        let mut ids = Vec::with_capacity(t);
        for (index, &tok) in inp.tokens.iter().enumerate() {
            if tok as usize >= vocab {
                return Err(ModelError::Token {
                    token: tok,
                    index,
                    vocab,
                });
            }
            ids.push(tok as i32);
        }
        if let Some(&bad) = inp.last.iter().find(|&&i| i < 0 || i as usize >= t) {
            return Err(ModelError::Inputs(format!(
                "last-row index {bad} outside 0..{t}"
            )));
        }
        if let Some(&p) = inp
            .positions
            .iter()
            .find(|&&p| p < 0 || p as usize >= lim.max_model_len)
        {
            return Err(ModelError::Capacity {
                start: p.max(0) as usize,
                end: p.max(0) as usize + 1,
                capacity: lim.max_model_len,
            });
        }
        Ok(ids)
    }

    /// Run one step: every token's K/V goes to its slot, and the logits of
    /// the `last` rows land in the workspace ([n, vocab]); sample them with
    /// [`GpuModel::sample`] or read them with [`GpuModel::logits_host`].
    pub fn step(&mut self, gpu: &Gpu, inp: &StepInput<'_>) -> Result<(), ModelError> {
        let ids = self.validate(inp)?;
        let (t, n) = (inp.tokens.len(), inp.last.len());
        self.upload_checked(gpu, inp, &ids)?;
        let seqs = match (&inp.seqs, self.prefill_kernel) {
            (Some(sq), true) => Some(self.upload_seqs(gpu, sq, t, inp.mbps)?),
            _ => None,
        };
        // Fused decode attention needs one row per sequence (each row's
        // context written before the launch): not prefill run as rows,
        // whose rows share their sequence's block table (first block).
        let decode = inp.seqs.is_none() && {
            let firsts: std::collections::HashSet<i32> = (0..t)
                .map(|i| inp.tables.get(i * inp.mbps).copied().unwrap_or(-1))
                .collect();
            firsts.len() == t
        };
        self.launch_forward_marked(gpu, t, n, inp.mbps, seqs, decode, None, false)?;
        self.last_rows = n;
        Ok(())
    }

    /// Check and upload a step's per-sequence view; (batch, max_q_len).
    fn upload_seqs(
        &mut self,
        gpu: &Gpu,
        sq: &SeqInput<'_>,
        t: usize,
        mbps: usize,
    ) -> Result<(usize, usize), ModelError> {
        let b = sq.kv_lens.len();
        let ok = sq.cu_seqlens.len() == b + 1
            && sq.cu_seqlens.first() == Some(&0)
            && sq.cu_seqlens.last() == Some(&(t as i32))
            && sq.cu_seqlens.windows(2).all(|w| w[0] <= w[1])
            && sq.tables.len() == b * mbps
            && b <= self.limits.max_seqs
            && sq.max_q_len <= t;
        if !ok {
            return Err(ModelError::Inputs(format!(
                "per-sequence view: {} cu_seqlens, {b} kv_lens, {} table entries for {t} tokens \
                 and {mbps} columns",
                sq.cu_seqlens.len(),
                sq.tables.len()
            )));
        }
        let ws = &mut self.ws;
        let s = gpu.stream();
        s.memcpy_htod(sq.cu_seqlens, &mut ws.cu_seqlens.slice_mut(..b + 1))
            .map_err(KernelError::driver("upload cu_seqlens"))?;
        s.memcpy_htod(sq.kv_lens, &mut ws.kv_lens.slice_mut(..b))
            .map_err(KernelError::driver("upload kv_lens"))?;
        s.memcpy_htod(sq.tables, &mut ws.seq_tables.slice_mut(..b * mbps))
            .map_err(KernelError::driver("upload sequence block tables"))?;
        Ok((b, sq.max_q_len))
    }

    /// Validate `inp` as [`GpuModel::step`] does and copy it into the workspace.
    fn upload(&mut self, gpu: &Gpu, inp: &StepInput<'_>) -> Result<(), ModelError> {
        let ids = self.validate(inp)?;
        self.upload_checked(gpu, inp, &ids)
    }

    fn upload_checked(
        &mut self,
        gpu: &Gpu,
        inp: &StepInput<'_>,
        ids: &[i32],
    ) -> Result<(), ModelError> {
        let (t, n) = (inp.tokens.len(), inp.last.len());
        let ws = &mut self.ws;
        let s = gpu.stream();
        let copy = |what: &'static str| KernelError::driver(what);
        s.memcpy_htod(ids, &mut ws.ids.slice_mut(..t))
            .map_err(copy("upload token ids"))?;
        s.memcpy_htod(inp.positions, &mut ws.pos.slice_mut(..t))
            .map_err(copy("upload positions"))?;
        s.memcpy_htod(inp.slots, &mut ws.slots.slice_mut(..t))
            .map_err(copy("upload slots"))?;
        s.memcpy_htod(inp.tables, &mut ws.tables.slice_mut(..t * inp.mbps))
            .map_err(copy("upload block tables"))?;
        s.memcpy_htod(inp.lens, &mut ws.lens.slice_mut(..t))
            .map_err(copy("upload context lengths"))?;
        s.memcpy_htod(inp.last, &mut ws.last.slice_mut(..n))
            .map_err(copy("upload last-row indices"))?;
        Ok(())
    }

    /// A decode step (one token per sequence) replayed from a CUDA graph
    /// captured once per padded batch size (`bucket`): the batch is padded
    /// with rows that write no cache slot (slot -1) and attend to one
    /// token, the block tables to the full width the graph was captured
    /// with. Same results as [`GpuModel::step`] for the real rows; one
    /// graph launch instead of ~11 launches per layer.
    pub fn step_decode_graph(
        &mut self,
        gpu: &Gpu,
        inp: &StepInput<'_>,
        bucket: usize,
    ) -> Result<(), ModelError> {
        let n = inp.tokens.len();
        if inp.last.len() != n || (0..n).any(|i| inp.last[i] != i as i32) {
            return Err(ModelError::Inputs(
                "a decode step samples every row, in order".into(),
            ));
        }
        if bucket < n || bucket > self.limits.max_seqs.min(self.limits.max_tokens) {
            return Err(ModelError::StepTooBig {
                what: "padded decode rows",
                got: bucket.max(n),
                limit: self.limits.max_seqs.min(self.limits.max_tokens),
            });
        }
        let width = self.limits.max_blocks_per_seq();
        if inp.mbps > width {
            return Err(ModelError::StepTooBig {
                what: "block-table columns",
                got: inp.mbps,
                limit: width,
            });
        }
        let mut tokens = inp.tokens.to_vec();
        tokens.resize(bucket, 0);
        let mut positions = inp.positions.to_vec();
        positions.resize(bucket, 0);
        let mut slots = inp.slots.to_vec();
        slots.resize(bucket, -1);
        let mut lens = inp.lens.to_vec();
        lens.resize(bucket, 1);
        let mut tables = Vec::with_capacity(bucket * width);
        for r in inp.tables.chunks(inp.mbps.max(1)).take(n) {
            tables.extend_from_slice(r);
            tables.extend(std::iter::repeat_n(0, width - r.len()));
        }
        tables.resize(bucket * width, 0);
        let last: Vec<i32> = (0..bucket as i32).collect();
        // Upload through the eager path's checks, then replay (or capture).
        let padded = StepInput {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            tables: &tables,
            mbps: width,
            lens: &lens,
            last: &last,
            seqs: None,
        };
        self.upload(gpu, &padded)?;
        let fresh = self
            .graphs
            .get(&bucket)
            .is_some_and(|(_, g)| *g == gpu.scratch_generation());
        if !fresh {
            // Run once eagerly (loads modules, sizes the scratch), then
            // capture under the scratch generation that run leaves.
            self.launch_forward(gpu, bucket, bucket, width)?;
            gpu.synchronize()?;
            let generation = gpu.scratch_generation();
            let graph = capture(gpu, "decode", || {
                self.launch_forward(gpu, bucket, bucket, width)
            })?;
            if gpu.scratch_generation() != generation {
                return Err(ModelError::Inputs(
                    "the scratch was reallocated during capture".into(),
                ));
            }
            self.graphs.insert(bucket, (graph, generation));
        }
        let (graph, _) = &self.graphs[&bucket];
        graph
            .launch()
            .map_err(KernelError::driver("cuGraphLaunch"))?;
        self.last_rows = n;
        Ok(())
    }

    /// GPU time per op of one step with these inputs (eager launches, a
    /// CUDA event before each op): for each label, the median over `reps`
    /// runs of its summed time per step, in µs, in the order ops first run.
    /// The cache slots of `inp` are written (same values every run).
    pub fn profile_step(
        &mut self,
        gpu: &Gpu,
        inp: &StepInput<'_>,
        reps: usize,
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        self.upload(gpu, inp)?;
        let (t, n) = (inp.tokens.len(), inp.last.len());
        self.launch_forward(gpu, t, n, inp.mbps)?; // warm-up
        gpu.synchronize()?;
        let mut per = OpTimes::default();
        for _ in 0..reps.max(1) {
            let mut marks = Vec::new();
            self.launch_forward_marked(gpu, t, n, inp.mbps, None, true, Some(&mut marks), false)?;
            gpu.synchronize()?;
            per.add(&marks)?;
        }
        Ok(per.medians())
    }

    /// [`GpuModel::profile_step`] as the engine's decode runs: the marked
    /// step is captured as one CUDA graph (each mark an event-record node)
    /// and replayed `reps` times, so the times carry no host launch gaps.
    pub fn profile_step_graph(
        &mut self,
        gpu: &Gpu,
        inp: &StepInput<'_>,
        reps: usize,
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        self.upload(gpu, inp)?;
        let (t, n) = (inp.tokens.len(), inp.last.len());
        self.launch_forward(gpu, t, n, inp.mbps)?; // warm-up: modules, scratch
        gpu.synchronize()?;
        let mut marks = Vec::new();
        let graph = capture(gpu, "profile", || {
            self.launch_forward_marked(gpu, t, n, inp.mbps, None, true, Some(&mut marks), true)
        })?;
        graph
            .launch()
            .map_err(KernelError::driver("cuGraphLaunch"))?; // warm-up replay
        gpu.synchronize()?;
        let mut per = OpTimes::default();
        for _ in 0..reps.max(1) {
            graph
                .launch()
                .map_err(KernelError::driver("cuGraphLaunch"))?;
            gpu.synchronize()?;
            per.add(&marks)?;
        }
        Ok(per.medians())
    }

    /// Median µs of `reps` replays of the decode graph for `bucket` (as
    /// captured by [`GpuModel::step_decode_graph`] with the current inputs).
    pub fn time_decode_graph(
        &mut self,
        gpu: &Gpu,
        bucket: usize,
        reps: usize,
    ) -> Result<f64, ModelError> {
        let (graph, _) = self.graphs.get(&bucket).ok_or_else(|| {
            ModelError::Inputs(format!("no decode graph captured for batch {bucket}"))
        })?;
        let (a, b) = (gpu.timing_event()?, gpu.timing_event()?);
        let s = gpu.stream();
        let mut v = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            a.record(s).map_err(KernelError::driver("cuEventRecord"))?;
            graph
                .launch()
                .map_err(KernelError::driver("cuGraphLaunch"))?;
            b.record(s).map_err(KernelError::driver("cuEventRecord"))?;
            b.synchronize()
                .map_err(KernelError::driver("cuEventSynchronize"))?;
            v.push(
                a.elapsed_ms(&b)
                    .map_err(KernelError::driver("cuEventElapsedTime"))? as f64
                    * 1e3,
            );
        }
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    }

    /// Number of decode graphs captured so far.
    pub fn num_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Switch the GEMM path; drops the captured graphs, which hold the old
    /// path's kernels and workspace.
    /// Split decode's o_proj and down GEMMs `splits` ways along K (0 or 1:
    /// off), where the dtype and shapes allow (`kernels::linear::
    /// split_k_supported`); allocates the partials for max_seqs rows.
    pub fn set_split_k(&mut self, gpu: &Gpu, splits: usize) -> Result<(), ModelError> {
        self.graphs.clear();
        self.partials = None;
        self.split_k = splits;
        if splits >= 2 {
            let n = splits * self.limits.max_seqs * self.cfg.hidden_size;
            self.partials = Some(zeros::<f32>(gpu, n)?);
        }
        Ok(())
    }

    pub fn set_gemm(&mut self, gpu: &Gpu, backend: GemmBackend) -> Result<(), ModelError> {
        self.graphs.clear();
        self.lt = match backend {
            GemmBackend::Cublas => None,
            GemmBackend::LtTuned => Some(LtLinear::new(gpu)?),
        };
        Ok(())
    }

    /// What cuBLASLt tuning chose per GEMM shape (empty on cublasGemmEx).
    pub fn gemm_plans(&self) -> Vec<kernels::linear_lt::PlanInfo> {
        self.lt.as_ref().map(|l| l.plans()).unwrap_or_default()
    }

    /// Every launch of one forward over the workspace's first t tokens
    /// (inputs already in `ws`): no host work but launches, no allocation,
    /// so a CUDA graph can capture it.
    fn launch_forward(
        &mut self,
        gpu: &Gpu,
        t: usize,
        n: usize,
        mbps: usize,
    ) -> Result<(), ModelError> {
        self.launch_forward_marked(gpu, t, n, mbps, None, true, None, false)
    }

    /// [`GpuModel::launch_forward`], recording a timing event before each
    /// op into `marks` (label, event) when given, and one `end` mark.
    /// `decode`: every row is its own sequence's one new token (decode
    /// attention may then store that token itself: v3f/v5f); false for a
    /// prefill, whether by the prefill kernel (`seqs`) or as decode rows.
    #[allow(clippy::too_many_arguments)]
    fn launch_forward_marked(
        &mut self,
        gpu: &Gpu,
        t: usize,
        n: usize,
        mbps: usize,
        seqs: Option<(usize, usize)>,
        decode: bool,
        mut marks: Option<&mut Vec<(&'static str, CudaEvent)>>,
        in_graph: bool,
    ) -> Result<(), ModelError> {
        let mut mark = |label: &'static str| -> Result<(), ModelError> {
            if let Some(m) = marks.as_mut() {
                let e = gpu.timing_event()?;
                if in_graph {
                    // Under capture a plain record only orders the capture;
                    // EXTERNAL makes it an event-record node that records
                    // at every replay.
                    // SAFETY: both handles are live; the stream is capturing.
                    unsafe {
                        cudarc::driver::sys::cuEventRecordWithFlags(
                            e.cu_event(),
                            gpu.stream().cu_stream(),
                            cudarc::driver::sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL
                                as u32,
                        )
                    }
                    .result()
                    .map_err(KernelError::driver("cuEventRecordWithFlags(EXTERNAL)"))?;
                } else {
                    e.record(gpu.stream())
                        .map_err(KernelError::driver("cuEventRecord"))?;
                }
                m.push((label, e));
            }
            Ok(())
        };
        let c = &self.cfg;
        let lim = self.limits;
        let (h, inter, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qh, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kd) = (qh * d, kvh * d);
        let vocab = c.vocab_size;
        let split_cap = self.decode_split_tokens;
        let attn_variant = self.decode_attention;
        let prefill_variant = self.prefill_attention;
        let fuse_qkv = self.fused_decode_qkv
            && kernels::paged_attention::fused_qkv_supported(T::DTYPE, c.head_dim);
        // Split-K o_proj / down (decode rows only: the partials hold max_seqs
        // rows); the add + RMSNorm after each sums the partials.
        let splits = self.split_k;
        let split_ok = |inp: usize| {
            decode
                && splits >= 2
                && t <= lim.max_seqs
                && kernels::linear::split_k_supported::<T>(inp, splits)
        };
        let (split_o, split_down) = (split_ok(qd), split_ok(inter));
        let GpuModel {
            layers,
            ws,
            rope,
            embed,
            lm_head,
            final_norm,
            lt,
            partials,
            ..
        } = self;
        let mut partials = partials.as_mut();
        // residual = embed[ids]: [t, h]
        mark("embedding gather")?;
        kernels::util::gather_rows(
            gpu,
            &mut ws.residual.slice_mut(..t * h),
            &embed.slice(..),
            &ws.ids.slice(..t),
            h,
        )?;
        let norm = RmsNormDims {
            tokens: t,
            hidden: h,
            eps: c.rms_norm_eps as f32,
        };
        let num_blocks = lim.num_blocks;
        for (l, w) in layers.iter_mut().enumerate() {
            if l == 0 {
                mark("rmsnorm (fused add)")?;
                kernels::rmsnorm::rmsnorm(
                    gpu,
                    &mut ws.hn.slice_mut(..t * h),
                    &ws.residual.slice(..t * h),
                    &w.in_norm.slice(..),
                    norm,
                    kernels::rmsnorm::PRODUCTION,
                )?;
            } else {
                mark("rmsnorm (fused add)")?;
                let p = partials.as_deref().filter(|_| split_down);
                add_norm_after(
                    gpu,
                    &mut ws.hn,
                    &mut ws.residual,
                    &ws.proj,
                    p,
                    splits,
                    &w.in_norm,
                    norm,
                )?;
            }
            mark("qkv GEMM")?;
            // One GEMM for q|k|v; the next kernel adds the bias as it reads.
            let nqkv = qd + 2 * kd;
            lin(
                lt,
                gpu,
                &mut ws.qkv.slice_mut(..t * nqkv),
                nqkv,
                &ws.hn.slice(..t * h),
                &w.qkv_w.slice(..),
                t,
                h,
                nqkv,
            )?;
            // Decode with v3f: attention adds the bias, rotates and stores
            // the new token itself (one launch fewer per layer).
            let fused = decode && seqs.is_none() && fuse_qkv;
            if !fused {
                mark("qkv bias + rope + kv store")?;
                kernels::rope_kv_store::qkv_rope_kv_store(
                    gpu,
                    QkvRopeKvStoreArgs {
                        q_out: &mut ws.q.slice_mut(..t * qd),
                        qkv: &ws.qkv.slice(..t * nqkv),
                        bias: &w.qkv_b.slice(..),
                        k_cache: &mut w.k_cache.slice_mut(..),
                        v_cache: &mut w.v_cache.slice_mut(..),
                        positions: &ws.pos.slice(..t),
                        slot_mapping: &ws.slots.slice(..t),
                    },
                    rope,
                    RopeKvStoreDims {
                        tokens: t,
                        q_heads: qh,
                        kv_heads: kvh,
                        head_dim: d,
                        block_size: BLOCK_SIZE,
                        num_blocks,
                    },
                    kernels::rope_kv_store::PRODUCTION,
                )?;
            }
            let pad = PagedAttentionDims {
                batch: t,
                q_heads: qh,
                kv_heads: kvh,
                head_dim: d,
                block_size: BLOCK_SIZE,
                num_blocks,
                max_blocks_per_seq: mbps,
                scale: 1.0 / (d as f32).sqrt(),
                max_split_tokens: split_cap,
            };
            if let Some((batch, max_q_len)) = seqs {
                mark("prefill_attention")?;
                kernels::prefill_attention::prefill_attention(
                    gpu,
                    &mut ws.attn.slice_mut(..t * qd),
                    &ws.q.slice(..t * qd),
                    &w.k_cache.slice(..),
                    &w.v_cache.slice(..),
                    &ws.cu_seqlens.slice(..batch + 1),
                    &ws.kv_lens.slice(..batch),
                    &ws.seq_tables.slice(..batch * mbps),
                    PrefillAttentionDims {
                        batch,
                        total_q: t,
                        max_q_len,
                        q_heads: qh,
                        kv_heads: kvh,
                        head_dim: d,
                        block_size: BLOCK_SIZE,
                        num_blocks,
                        max_blocks_per_seq: mbps,
                        scale: 1.0 / (d as f32).sqrt(),
                    },
                    prefill_variant,
                )?;
            } else if fused {
                mark(DECODE_ATTENTION)?;
                kernels::paged_attention::paged_attention_fused_qkv(
                    gpu,
                    &mut ws.attn.slice_mut(..t * qd),
                    FusedQkv {
                        qkv: &ws.qkv.slice(..t * nqkv),
                        bias: &w.qkv_b.slice(..),
                        k_cache: &mut w.k_cache.slice_mut(..),
                        v_cache: &mut w.v_cache.slice_mut(..),
                        positions: &ws.pos.slice(..t),
                        slot_mapping: &ws.slots.slice(..t),
                    },
                    &ws.tables.slice(..t * mbps),
                    &ws.lens.slice(..t),
                    rope,
                    pad,
                    attn_variant,
                )?;
            } else {
                mark(DECODE_ATTENTION)?;
                kernels::paged_attention::paged_attention(
                    gpu,
                    &mut ws.attn.slice_mut(..t * qd),
                    &ws.q.slice(..t * qd),
                    &w.k_cache.slice(..),
                    &w.v_cache.slice(..),
                    &ws.tables.slice(..t * mbps),
                    &ws.lens.slice(..t),
                    pad,
                    attn_variant,
                )?;
            }
            mark("o_proj GEMM")?;
            let p = partials.as_deref_mut().filter(|_| split_o);
            let x = ws.attn.slice(..t * qd);
            project_hidden(lt, gpu, p, splits, &mut ws.proj, &x, &w.o_w, t, qd, h)?;
            mark("rmsnorm (fused add)")?;
            let p = partials.as_deref().filter(|_| split_o);
            add_norm_after(
                gpu,
                &mut ws.hn,
                &mut ws.residual,
                &ws.proj,
                p,
                splits,
                &w.post_norm,
                norm,
            )?;
            // gate | up side by side in one [t, 2I] buffer: silu_mul's layout.
            mark("gate|up GEMM")?;
            lin(
                lt,
                gpu,
                &mut ws.gu.slice_mut(..t * 2 * inter),
                2 * inter,
                &ws.hn.slice(..t * h),
                &w.gate_up_w.slice(..),
                t,
                h,
                2 * inter,
            )?;
            mark("silu_mul")?;
            kernels::silu_mul::silu_mul(
                gpu,
                &mut ws.act.slice_mut(..t * inter),
                &ws.gu.slice(..t * 2 * inter),
                t,
                inter,
                kernels::silu_mul::PRODUCTION,
            )?;
            mark("down GEMM")?;
            let p = partials.as_deref_mut().filter(|_| split_down);
            let x = ws.act.slice(..t * inter);
            project_hidden(lt, gpu, p, splits, &mut ws.proj, &x, &w.down_w, t, inter, h)?;
        }
        mark("rmsnorm (fused add)")?;
        let p = partials.as_deref().filter(|_| split_down);
        add_norm_after(
            gpu,
            &mut ws.hn,
            &mut ws.residual,
            &ws.proj,
            p,
            splits,
            final_norm,
            norm,
        )?;
        // Only the rows whose next token is wanted go through the LM head.
        mark("last-row gather")?;
        kernels::util::gather_rows(
            gpu,
            &mut ws.last_h.slice_mut(..n * h),
            &ws.hn.slice(..t * h),
            &ws.last.slice(..n),
            h,
        )?;
        let head = lm_head.as_ref().unwrap_or(embed);
        mark("LM head GEMM")?;
        lin(
            lt,
            gpu,
            &mut ws.logits.slice_mut(..n * vocab),
            vocab,
            &ws.last_h.slice(..n * h),
            &head.slice(..),
            n,
            h,
            vocab,
        )?;
        mark("end")?;
        Ok(())
    }

    /// One token per logits row of the last step: greedy where
    /// `inv_temp[i] == 0`, else drawn from softmax(logits / T) with the row's
    /// seed (Gumbel-max on the GPU). Copies back n token ids, nothing else.
    pub fn sample(
        &mut self,
        gpu: &Gpu,
        inv_temp: &[f32],
        seeds: &[u64],
    ) -> Result<Vec<u32>, ModelError> {
        let n = self.last_rows;
        if inv_temp.len() != n || seeds.len() != n {
            return Err(ModelError::Inputs(format!(
                "{n} logits rows but {} temperatures and {} seeds",
                inv_temp.len(),
                seeds.len()
            )));
        }
        let vocab = self.cfg.vocab_size;
        let ws = &mut self.ws;
        let s = gpu.stream();
        s.memcpy_htod(inv_temp, &mut ws.inv_temp.slice_mut(..n))
            .map_err(KernelError::driver("upload temperatures"))?;
        s.memcpy_htod(seeds, &mut ws.seeds.slice_mut(..n))
            .map_err(KernelError::driver("upload seeds"))?;
        kernels::util::sample_rows(
            gpu,
            &mut ws.sampled.slice_mut(..n),
            &ws.logits.slice(..n * vocab),
            vocab,
            vocab,
            &ws.inv_temp.slice(..n),
            &ws.seeds.slice(..n),
        )?;
        let mut out = vec![0i32; n];
        s.memcpy_dtoh(&ws.sampled.slice(..n), &mut out)
            .map_err(KernelError::driver("read sampled tokens"))?;
        out.into_iter()
            .map(|x| {
                u32::try_from(x).map_err(|_| {
                    ModelError::Inputs("a logits row was all NaN (no token to sample)".into())
                })
            })
            .collect()
    }

    /// Logits row `row` of the last step, as f32 (for samplers the GPU
    /// does not do: top-k, top-p).
    pub fn logits_host(&self, gpu: &Gpu, row: usize) -> Result<Vec<f32>, ModelError> {
        if row >= self.last_rows {
            return Err(ModelError::Inputs(format!(
                "logits row {row} of {}",
                self.last_rows
            )));
        }
        let vocab = self.cfg.vocab_size;
        let host = gpu
            .stream()
            .clone_dtoh(&self.ws.logits.slice(row * vocab..(row + 1) * vocab))
            .map_err(KernelError::driver("read logits"))?;
        Ok(host.into_iter().map(|x| x.to_f64() as f32).collect())
    }

    /// One sequence occupying the pool from block 0 (identity block table):
    /// run `tokens` at positions start.. and return their logits, [tokens,
    /// vocab] row-major, as f32.
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        start: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::Empty);
        }
        if start + t > self.capacity() {
            return Err(ModelError::Capacity {
                start,
                end: start + t,
                capacity: self.capacity(),
            });
        }
        let mbps = (start + t).div_ceil(BLOCK_SIZE);
        let positions: Vec<i32> = (start..start + t).map(|p| p as i32).collect();
        let slots: Vec<i64> = (start..start + t).map(|p| p as i64).collect();
        let tables: Vec<i32> = (0..t).flat_map(|_| 0..mbps as i32).collect();
        let lens: Vec<i32> = (start..start + t).map(|p| p as i32 + 1).collect();
        let last: Vec<i32> = (0..t as i32).collect();
        self.step(
            gpu,
            &StepInput {
                tokens,
                positions: &positions,
                slots: &slots,
                tables: &tables,
                mbps,
                lens: &lens,
                last: &last,
                seqs: None,
            },
        )?;
        let vocab = self.cfg.vocab_size;
        let host = gpu
            .stream()
            .clone_dtoh(&self.ws.logits.slice(..t * vocab))
            .map_err(KernelError::driver("read logits"))?;
        Ok(host.into_iter().map(|x| x.to_f64() as f32).collect())
    }

    /// Greedy decoding of one sequence: prefill `prompt`, then `n` tokens
    /// one at a time, each picked on the GPU.
    pub fn greedy(&mut self, gpu: &Gpu, prompt: &[u32], n: usize) -> Result<Vec<u32>, ModelError> {
        let vocab = self.cfg.vocab_size;
        let argmax = |row: &[f32]| -> u32 {
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best as u32
        };
        let logits = self.forward(gpu, prompt, 0)?;
        let mut next = argmax(&logits[(prompt.len() - 1) * vocab..prompt.len() * vocab]);
        let mut out = vec![next];
        for pos in prompt.len()..prompt.len() + n.saturating_sub(1) {
            self.forward(gpu, &[next], pos)?;
            // The GPU sampler at temperature 0 must agree with the host argmax.
            next = self.sample(gpu, &[0.0], &[0])?[0];
            out.push(next);
        }
        out.truncate(n);
        Ok(out)
    }
}

/// Captures the launches `f` makes on the GPU's stream as one CUDA graph
/// (ending the capture even when `f` fails, so the stream stays usable).
fn capture(
    gpu: &Gpu,
    what: &str,
    f: impl FnOnce() -> Result<(), ModelError>,
) -> Result<CudaGraph, ModelError> {
    let s = gpu.stream().clone();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(KernelError::driver("cuStreamBeginCapture"))?;
    let captured = f();
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(KernelError::driver("cuStreamEndCapture"))?;
    captured?;
    graph.ok_or_else(|| ModelError::Inputs(format!("{what} graph capture produced no graph")))
}

/// Per-op GPU time of repeated marked steps: each mark's label gets the
/// time to the next mark, summed over the step (an op runs once per layer).
#[derive(Default)]
struct OpTimes(Vec<(&'static str, Vec<f64>)>);

impl OpTimes {
    fn add(&mut self, marks: &[(&'static str, CudaEvent)]) -> Result<(), ModelError> {
        let mut sums: Vec<(&'static str, f64)> = Vec::new();
        for w in marks.windows(2) {
            let us = w[0]
                .1
                .elapsed_ms(&w[1].1)
                .map_err(KernelError::driver("cuEventElapsedTime"))? as f64
                * 1e3;
            match sums.iter_mut().find(|(l, _)| *l == w[0].0) {
                Some((_, v)) => *v += us,
                None => sums.push((w[0].0, us)),
            }
        }
        for (label, us) in sums {
            match self.0.iter_mut().find(|(l, _)| *l == label) {
                Some((_, v)) => v.push(us),
                None => self.0.push((label, vec![us])),
            }
        }
        Ok(())
    }

    /// The median per op, in the order ops first ran.
    fn medians(self) -> Vec<(&'static str, f64)> {
        self.0
            .into_iter()
            .map(|(l, mut v)| {
                v.sort_by(f64::total_cmp);
                (l, v[v.len() / 2])
            })
            .collect()
    }
}

/// Random-initialization families (std 0.02 is HF's `initializer_range`).
#[derive(Clone, Copy)]
enum Init {
    Matrix,
    Bias,
    Norm,
}

impl Init {
    fn range(self) -> (f32, f32) {
        // Uniform(-a, a) has std a / sqrt(3): a = 0.02 * sqrt(3).
        let a = 0.02 * 3f32.sqrt();
        match self {
            Init::Matrix => (-a, a),
            Init::Bias => (-0.02, 0.02),
            Init::Norm => (0.9, 1.1),
        }
    }
}
