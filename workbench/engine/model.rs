//! The Qwen2 forward on the GPU, assembled from the workbench's kernels and
//! cuBLAS: a first, eager, one-sequence-at-a-time version whose job is to be
//! right (it is checked against Hugging Face's logits in `tests/hf_parity.rs`).
//! Batching, CUDA graphs and an allocation-free decode step come later.
//!
//! Per layer, with the residual stream kept as HF rounds it:
//!   hn = RMSNorm(residual)                         (rmsnorm / fused_add_rmsnorm)
//!   q, k, v = hn·Wq^T + bq, hn·Wk^T + bk, hn·Wv^T + bv     (linear + add_bias)
//!   q, k = RoPE(q, k, positions); k, v -> paged cache        (rope, kv_store)
//!   attn = causal GQA attention of q over the cache          (paged_attention)
//!   residual += attn·Wo^T; hn = RMSNorm(residual)            (fused_add_rmsnorm)
//!   residual += down(silu(hn·Wg^T) * (hn·Wu^T))              (linear, silu_mul)
//! Prefill attention uses the decode kernel with one "sequence" per prompt
//! token, each seeing the cache up to its own position: causal by
//! construction, correct, not fast (prefill attention is its own kernel,
//! issue #4).

use super::config::Qwen2Config;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use kernels::kv_store::KvStoreDims;
use kernels::paged_attention::PagedAttentionDims;
use kernels::rmsnorm::RmsNormDims;
use kernels::rope::{RopeDims, RopeTable};
use kernels::{Gpu, KernelError, Storage};
use thiserror::Error;

pub const BLOCK_SIZE: usize = 16;

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
    #[error("empty input")]
    Empty,
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

struct Layer<T> {
    in_norm: CudaSlice<T>,
    post_norm: CudaSlice<T>,
    q_w: CudaSlice<T>,
    q_b: CudaSlice<T>,
    k_w: CudaSlice<T>,
    k_b: CudaSlice<T>,
    v_w: CudaSlice<T>,
    v_b: CudaSlice<T>,
    o_w: CudaSlice<T>,
    gate_w: CudaSlice<T>,
    up_w: CudaSlice<T>,
    down_w: CudaSlice<T>,
    /// [num_blocks, BLOCK_SIZE, kv_heads, head_dim]
    k_cache: CudaSlice<T>,
    v_cache: CudaSlice<T>,
}

pub struct GpuModel<T> {
    cfg: Qwen2Config,
    /// [vocab, hidden] on the host for the embedding gather.
    embed_host: Vec<T>,
    /// [vocab, hidden]: the LM head when tied.
    embed: CudaSlice<T>,
    lm_head: Option<CudaSlice<T>>,
    final_norm: CudaSlice<T>,
    layers: Vec<Layer<T>>,
    rope: RopeTable,
    num_blocks: usize,
}

fn upload<T: Storage>(gpu: &Gpu, v: &[T]) -> Result<CudaSlice<T>, ModelError> {
    Ok(gpu
        .stream()
        .clone_htod(v)
        .map_err(KernelError::driver("upload weights"))?)
}

fn zeros<T: Storage>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>, ModelError> {
    Ok(gpu
        .stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(KernelError::driver("allocate activations"))?)
}

/// y [t, out] = x [t, in] · W^T + b (a projection with bias: q, k, v).
#[allow(clippy::too_many_arguments)]
fn project<T: Storage>(
    gpu: &Gpu,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    b: &CudaSlice<T>,
    t: usize,
    in_features: usize,
    out_features: usize,
) -> Result<(), ModelError>
where
    CudaBlas: Gemm<T>,
{
    kernels::linear::linear(
        gpu,
        &mut y.slice_mut(..),
        out_features,
        &x.slice(..),
        &w.slice(..),
        t,
        in_features,
        out_features,
    )?;
    kernels::util::add_bias(gpu, &mut y.slice_mut(..), &b.slice(..), t, out_features)?;
    Ok(())
}

/// residual += x (rounded to T); hn = RMSNorm(residual) * weight.
fn add_norm<T: Storage>(
    gpu: &Gpu,
    hn: &mut CudaSlice<T>,
    residual: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    norm: RmsNormDims,
) -> Result<(), ModelError> {
    kernels::rmsnorm::fused_add_rmsnorm(
        gpu,
        &mut hn.slice_mut(..),
        &mut residual.slice_mut(..),
        &x.slice(..),
        &weight.slice(..),
        norm,
        kernels::rmsnorm::PRODUCTION,
    )?;
    Ok(())
}

impl<T: Storage> GpuModel<T>
where
    CudaBlas: Gemm<T>,
{
    /// Load from a tensor source giving HF-named tensors as f32 values;
    /// `capacity` is the KV cache size in tokens (one sequence).
    pub fn load(
        gpu: &Gpu,
        cfg: &Qwen2Config,
        get: &dyn Fn(&str) -> Option<Vec<f32>>,
        capacity: usize,
    ) -> Result<Self, ModelError> {
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kd) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let host = |name: &str, n: usize| -> Result<Vec<T>, ModelError> {
            let v = get(name).ok_or_else(|| ModelError::Missing(name.to_string()))?;
            if v.len() != n {
                return Err(ModelError::Size {
                    name: name.into(),
                    expected: n,
                    actual: v.len(),
                });
            }
            Ok(v.into_iter().map(|x| T::from_f64(x as f64)).collect())
        };
        let dev = |name: &str, n: usize| -> Result<CudaSlice<T>, ModelError> {
            upload(gpu, &host(name, n)?)
        };
        let num_blocks = capacity.div_ceil(BLOCK_SIZE).max(1);
        let cache = num_blocks * BLOCK_SIZE * kd;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            layers.push(Layer {
                in_norm: dev(&p("input_layernorm.weight"), h)?,
                post_norm: dev(&p("post_attention_layernorm.weight"), h)?,
                q_w: dev(&p("self_attn.q_proj.weight"), qd * h)?,
                q_b: dev(&p("self_attn.q_proj.bias"), qd)?,
                k_w: dev(&p("self_attn.k_proj.weight"), kd * h)?,
                k_b: dev(&p("self_attn.k_proj.bias"), kd)?,
                v_w: dev(&p("self_attn.v_proj.weight"), kd * h)?,
                v_b: dev(&p("self_attn.v_proj.bias"), kd)?,
                o_w: dev(&p("self_attn.o_proj.weight"), h * qd)?,
                gate_w: dev(&p("mlp.gate_proj.weight"), i * h)?,
                up_w: dev(&p("mlp.up_proj.weight"), i * h)?,
                down_w: dev(&p("mlp.down_proj.weight"), h * i)?,
                k_cache: zeros(gpu, cache)?,
                v_cache: zeros(gpu, cache)?,
            });
        }
        let embed_host = host("model.embed_tokens.weight", cfg.vocab_size * h)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(dev("lm_head.weight", cfg.vocab_size * h)?)
        };
        Ok(GpuModel {
            embed: upload(gpu, &embed_host)?,
            embed_host,
            lm_head,
            final_norm: dev("model.norm.weight", h)?,
            layers,
            rope: RopeTable::new(gpu, capacity.max(1), d, cfg.rope_theta)?,
            num_blocks,
            cfg: cfg.clone(),
        })
    }

    pub fn capacity(&self) -> usize {
        (self.num_blocks * BLOCK_SIZE).min(self.rope.max_positions)
    }

    /// Run `tokens` at positions start.. (writing their K/V into the cache)
    /// and return their logits, [tokens, vocab] row-major, as f32.
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        tokens: &[u32],
        start: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let c = &self.cfg;
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
        let (h, inter, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qh, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        let (qd, kd) = (qh * d, kvh * d);
        // Embedding gather on the host: [t, hidden].
        let mut x_host = Vec::with_capacity(t * h);
        for (idx, &tok) in tokens.iter().enumerate() {
            let row = tok as usize;
            if row >= c.vocab_size {
                return Err(ModelError::Token {
                    token: tok,
                    index: idx,
                    vocab: c.vocab_size,
                });
            }
            x_host.extend_from_slice(&self.embed_host[row * h..(row + 1) * h]);
        }
        let positions: Vec<i32> = (start..start + t).map(|p| p as i32).collect();
        let slots: Vec<i64> = (start..start + t).map(|p| p as i64).collect();
        let mbps = self.num_blocks;
        // One attention "sequence" per token, each with the whole block table
        // (identity: block j holds positions j*16..) and its own causal length.
        let tables: Vec<i32> = (0..t).flat_map(|_| 0..mbps as i32).collect();
        let lens: Vec<i32> = (start..start + t).map(|p| p as i32 + 1).collect();
        let s = gpu.stream();
        let up_i32 = |v: &[i32]| {
            s.clone_htod(v)
                .map_err(KernelError::driver("upload indices"))
        };
        let (d_pos, d_tables, d_lens) = (up_i32(&positions)?, up_i32(&tables)?, up_i32(&lens)?);
        let d_slots = s
            .clone_htod(&slots)
            .map_err(KernelError::driver("upload slots"))?;

        let x = upload(gpu, &x_host)?;
        let mut residual = zeros::<T>(gpu, t * h)?;
        let mut hn = zeros::<T>(gpu, t * h)?;
        let (mut q, mut k, mut v) = (
            zeros::<T>(gpu, t * qd)?,
            zeros::<T>(gpu, t * kd)?,
            zeros::<T>(gpu, t * kd)?,
        );
        let mut attn = zeros::<T>(gpu, t * qd)?;
        let mut proj = zeros::<T>(gpu, t * h)?; // o_proj, then down_proj output
        let mut gu = zeros::<T>(gpu, t * 2 * inter)?;
        let mut act = zeros::<T>(gpu, t * inter)?;
        let norm = RmsNormDims {
            tokens: t,
            hidden: h,
            eps: c.rms_norm_eps as f32,
        };
        let cache_len = self.num_blocks * BLOCK_SIZE * kd;
        use kernels::linear::linear;
        for (l, w) in self.layers.iter_mut().enumerate() {
            if l == 0 {
                s.memcpy_dtod(&x, &mut residual)
                    .map_err(KernelError::driver("copy residual"))?;
                kernels::rmsnorm::rmsnorm(
                    gpu,
                    &mut hn.slice_mut(..),
                    &x.slice(..),
                    &w.in_norm.slice(..),
                    norm,
                    kernels::rmsnorm::PRODUCTION,
                )?;
            } else {
                add_norm(gpu, &mut hn, &mut residual, &proj, &w.in_norm, norm)?;
            }
            project(gpu, &mut q, &hn, &w.q_w, &w.q_b, t, h, qd)?;
            project(gpu, &mut k, &hn, &w.k_w, &w.k_b, t, h, kd)?;
            project(gpu, &mut v, &hn, &w.v_w, &w.v_b, t, h, kd)?;
            let rd = RopeDims {
                tokens: t,
                q_heads: qh,
                kv_heads: kvh,
                head_dim: d,
            };
            kernels::rope::rope(
                gpu,
                &mut q.slice_mut(..),
                &mut k.slice_mut(..),
                &d_pos.slice(..),
                &self.rope,
                rd,
                kernels::rope::PRODUCTION,
            )?;
            let kvd = KvStoreDims {
                tokens: t,
                kv_heads: kvh,
                head_dim: d,
                block_size: BLOCK_SIZE,
                num_blocks: self.num_blocks,
            };
            kernels::kv_store::kv_store(
                gpu,
                &mut w.k_cache.slice_mut(..cache_len),
                &mut w.v_cache.slice_mut(..cache_len),
                &k.slice(..),
                &v.slice(..),
                &d_slots.slice(..),
                kvd,
                kernels::kv_store::PRODUCTION,
            )?;
            let pad = PagedAttentionDims {
                batch: t,
                q_heads: qh,
                kv_heads: kvh,
                head_dim: d,
                block_size: BLOCK_SIZE,
                num_blocks: self.num_blocks,
                max_blocks_per_seq: mbps,
                scale: 1.0 / (d as f32).sqrt(),
            };
            kernels::paged_attention::paged_attention(
                gpu,
                &mut attn.slice_mut(..),
                &q.slice(..),
                &w.k_cache.slice(..cache_len),
                &w.v_cache.slice(..cache_len),
                &d_tables.slice(..),
                &d_lens.slice(..),
                pad,
                kernels::paged_attention::PRODUCTION,
            )?;
            linear(
                gpu,
                &mut proj.slice_mut(..),
                h,
                &attn.slice(..),
                &w.o_w.slice(..),
                t,
                qd,
                h,
            )?;
            add_norm(gpu, &mut hn, &mut residual, &proj, &w.post_norm, norm)?;
            // gate | up side by side in one [t, 2I] buffer: silu_mul's layout.
            linear(
                gpu,
                &mut gu.slice_mut(..),
                2 * inter,
                &hn.slice(..),
                &w.gate_w.slice(..),
                t,
                h,
                inter,
            )?;
            linear(
                gpu,
                &mut gu.slice_mut(inter..),
                2 * inter,
                &hn.slice(..),
                &w.up_w.slice(..),
                t,
                h,
                inter,
            )?;
            kernels::silu_mul::silu_mul(gpu, &mut act.slice_mut(..), &gu.slice(..), t, inter)?;
            linear(
                gpu,
                &mut proj.slice_mut(..),
                h,
                &act.slice(..),
                &w.down_w.slice(..),
                t,
                inter,
                h,
            )?;
        }
        add_norm(gpu, &mut hn, &mut residual, &proj, &self.final_norm, norm)?;
        let vocab = c.vocab_size;
        let mut logits = zeros::<T>(gpu, t * vocab)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        linear(
            gpu,
            &mut logits.slice_mut(..),
            vocab,
            &hn.slice(..),
            &head.slice(..),
            t,
            h,
            vocab,
        )?;
        let host = s
            .clone_dtoh(&logits)
            .map_err(KernelError::driver("read logits"))?;
        Ok(host
            .into_iter()
            .take(t * vocab)
            .map(|x| x.to_f64() as f32)
            .collect())
    }

    /// Greedy decoding: prefill `prompt`, then `n` tokens one at a time.
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
            let l = self.forward(gpu, &[next], pos)?;
            next = argmax(&l);
            out.push(next);
        }
        out.truncate(n);
        Ok(out)
    }
}
