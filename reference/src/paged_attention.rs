//! Decode attention (one query token per sequence), contiguous and paged.
//!
//! [`contiguous_decode`] is the definition, for one sequence:
//!
//! ```text
//! q: [q_heads, head_dim]    k, v: [context, kv_heads, head_dim]
//! group    = q_heads / kv_heads            (GQA; q_heads % kv_heads == 0)
//! kvh      = h / group                     (query head h reads kv head kvh)
//! s[t]     = scale * dot(q[h], k[t, kvh])
//! p        = softmax(s)                    (max-subtracted)
//! out[h]   = sum_t p[t] * v[t, kvh]        -> out: [q_heads, head_dim]
//! ```
//!
//! An empty context (`context == 0`) gives zeros.
//!
//! [`paged_decode`] runs a batch against a paged cache
//! `[num_blocks, block_size, kv_heads, head_dim]`: token `j` of sequence `b`
//! lives at block `block_tables[b, j / block_size]`, offset
//! `j % block_size`. It gathers the first `context_lens[b]` tokens into
//! contiguous arrays and calls [`contiguous_decode`], so it reads only live
//! slots: unused slots (even NaN) never enter a sum, and block-table entries
//! past the live blocks are never looked at.
//!
//! Everything is `f64` with no intermediate rounding. The GPU kernel's
//! dtype conversions and its online (tiled) softmax are absorbed in the
//! comparison tolerance.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, ArrayView4};

use crate::ShapeError;

/// `exp(s - max(s)) / sum(exp(s - max(s)))`. Empty in, empty out.
///
/// Scores are expected to be finite (all `-inf` would give NaN).
pub fn softmax(scores: &[f64]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Decode attention of one query token against one contiguous sequence.
///
/// `q`: `[q_heads, head_dim]`, `k`, `v`: `[context, kv_heads, head_dim]`;
/// returns `[q_heads, head_dim]`.
pub fn contiguous_decode(
    q: ArrayView2<f64>,
    k: ArrayView3<f64>,
    v: ArrayView3<f64>,
    scale: f64,
) -> Result<Array2<f64>, ShapeError> {
    const OP: &str = "contiguous_decode";
    let (q_heads, head_dim) = q.dim();
    let (context, kv_heads, k_dim) = k.dim();
    if k_dim != head_dim {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "k",
            expected: vec![context, kv_heads, head_dim],
            actual: k.shape().to_vec(),
        });
    }
    if v.shape() != k.shape() {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "v",
            expected: k.shape().to_vec(),
            actual: v.shape().to_vec(),
        });
    }
    check_gqa(OP, "k", k.shape(), q_heads, kv_heads)?;

    let group = q_heads / kv_heads;
    let mut out = Array2::zeros((q_heads, head_dim)); // [q_heads, head_dim]
    if context == 0 {
        return Ok(out);
    }
    for h in 0..q_heads {
        let kvh = h / group;
        let scores: Vec<f64> = (0..context) // [context]
            .map(|t| {
                scale
                    * (0..head_dim)
                        .map(|d| q[[h, d]] * k[[t, kvh, d]])
                        .sum::<f64>()
            })
            .collect();
        let probs = softmax(&scores); // [context]
        for (t, p) in probs.iter().enumerate() {
            for d in 0..head_dim {
                out[[h, d]] += p * v[[t, kvh, d]];
            }
        }
    }
    Ok(out)
}

/// Decode attention for a batch of sequences stored in a paged KV cache.
///
/// `q`: `[batch, q_heads, head_dim]`; `k_cache`, `v_cache`:
/// `[num_blocks, block_size, kv_heads, head_dim]`; `block_tables`:
/// `[batch, max_blocks_per_seq]`; `context_lens`: `[batch]`. Returns
/// `[batch, q_heads, head_dim]`.
pub fn paged_decode(
    q: ArrayView3<f64>,
    k_cache: ArrayView4<f64>,
    v_cache: ArrayView4<f64>,
    block_tables: ArrayView2<i32>,
    context_lens: &[i32],
    scale: f64,
) -> Result<Array3<f64>, ShapeError> {
    const OP: &str = "paged_decode";
    let (batch, q_heads, head_dim) = q.dim();
    let (num_blocks, block_size, kv_heads, k_dim) = k_cache.dim();
    let max_blocks = block_tables.ncols();
    if k_dim != head_dim {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "k_cache",
            expected: vec![num_blocks, block_size, kv_heads, head_dim],
            actual: k_cache.shape().to_vec(),
        });
    }
    if v_cache.shape() != k_cache.shape() {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "v_cache",
            expected: k_cache.shape().to_vec(),
            actual: v_cache.shape().to_vec(),
        });
    }
    check_gqa(OP, "k_cache", k_cache.shape(), q_heads, kv_heads)?;
    if block_tables.nrows() != batch {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "block_tables",
            expected: vec![batch, max_blocks],
            actual: block_tables.shape().to_vec(),
        });
    }
    if context_lens.len() != batch {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "context_lens",
            expected: vec![batch],
            actual: vec![context_lens.len()],
        });
    }
    let capacity = max_blocks * block_size;
    for (b, &len) in context_lens.iter().enumerate() {
        if len < 0 || len as u64 > capacity as u64 {
            return Err(ShapeError::OutOfRange {
                op: OP,
                arg: "context_lens",
                index: vec![b],
                value: i64::from(len),
                expected: format!(
                    "a length in [0, {capacity}] (max_blocks_per_seq {max_blocks} * block_size {block_size})"
                ),
            });
        }
        // Only the blocks holding live tokens are checked (and later read).
        let live_blocks = (len as usize).div_ceil(block_size.max(1));
        for i in 0..live_blocks {
            let id = block_tables[[b, i]];
            if id < 0 || id as u64 >= num_blocks as u64 {
                return Err(ShapeError::OutOfRange {
                    op: OP,
                    arg: "block_tables",
                    index: vec![b, i],
                    value: i64::from(id),
                    expected: format!("a block id in [0, {num_blocks})"),
                });
            }
        }
    }

    let mut out = Array3::zeros((batch, q_heads, head_dim)); // [batch, q_heads, head_dim]
    for (b, &len) in context_lens.iter().enumerate() {
        let len = len as usize; // validated non-negative above
        let mut k = Array3::zeros((len, kv_heads, head_dim)); // [context, kv_heads, head_dim]
        let mut v = Array3::zeros((len, kv_heads, head_dim)); // [context, kv_heads, head_dim]
        for j in 0..len {
            let block = block_tables[[b, j / block_size]] as usize; // validated above
            let offset = j % block_size;
            k.slice_mut(s![j, .., ..])
                .assign(&k_cache.slice(s![block, offset, .., ..]));
            v.slice_mut(s![j, .., ..])
                .assign(&v_cache.slice(s![block, offset, .., ..]));
        }
        let o = contiguous_decode(q.slice(s![b, .., ..]), k.view(), v.view(), scale)?;
        out.slice_mut(s![b, .., ..]).assign(&o);
    }
    Ok(out)
}

/// `kv_heads >= 1` and `q_heads % kv_heads == 0`, reported against `arg`.
fn check_gqa(
    op: &'static str,
    arg: &'static str,
    shape: &[usize],
    q_heads: usize,
    kv_heads: usize,
) -> Result<(), ShapeError> {
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(ShapeError::Invalid {
            op,
            arg,
            actual: shape.to_vec(),
            requirement: format!("kv_heads >= 1 dividing q_heads ({q_heads})"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
