//! Launcher for `cuda/rope.cu` (NeoX rotary embedding, in place) and the
//! f32 cos/sin table it reads.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{
    all_aligned16, cfg, grid_u32, threads_for, token_columns, typed_function, KernelArg,
    SPLIT_TOKENS,
};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

const OP: &str = "rope";

/// The cos/sin table [max_positions, head_dim]: row p = cos(p * inv_freq) |
/// sin(p * inv_freq), inv_freq[i] = theta^(-2i/head_dim). Angles are formed and
/// evaluated in f64, then stored in f32.
pub fn cos_sin_table(max_positions: usize, head_dim: usize, theta: f64) -> Vec<f32> {
    let half = head_dim / 2;
    let mut t = vec![0f32; max_positions * head_dim];
    for p in 0..max_positions {
        for i in 0..half {
            let inv = theta.powf(-2.0 * i as f64 / head_dim as f64);
            let a = p as f64 * inv;
            t[p * head_dim + i] = a.cos() as f32;
            t[p * head_dim + half + i] = a.sin() as f32;
        }
    }
    t
}

/// The table on the device, with the shape it was built for.
pub struct RopeTable {
    pub data: CudaSlice<f32>,
    pub max_positions: usize,
    pub head_dim: usize,
}

impl RopeTable {
    pub fn new(gpu: &Gpu, max_positions: usize, head_dim: usize, theta: f64) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 256 {
            return Err(KernelError::Unsupported {
                op: OP,
                what: format!("head_dim {head_dim} (need even, 2..=256)"),
            });
        }
        dim_i32(OP, "max_positions", max_positions)?;
        let host = cos_sin_table(max_positions, head_dim, theta);
        let data = gpu
            .stream()
            .clone_htod(&host)
            .map_err(KernelError::driver("upload rope table"))?;
        Ok(RopeTable {
            data,
            max_positions,
            head_dim,
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RopeDims {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2", "v3", "v4"];
pub const PRODUCTION: &str = "v4";

/// Rotate q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] in
/// place at positions [tokens]. A position outside the table turns that
/// token's q and k into NaN (see rope.cu).
pub fn rope<T: Storage>(
    gpu: &Gpu,
    q: &mut CudaViewMut<T>,
    k: &mut CudaViewMut<T>,
    positions: &CudaView<i32>,
    table: &RopeTable,
    d: RopeDims,
    variant: &str,
) -> Result<()> {
    if table.head_dim != d.head_dim {
        return Err(KernelError::shape(
            OP,
            "table head_dim",
            d.head_dim,
            table.head_dim,
        ));
    }
    let q_heads = dim_i32(OP, "q_heads", d.q_heads)?;
    let kv_heads = dim_i32(OP, "kv_heads", d.kv_heads)?;
    let head_dim = dim_i32(OP, "head_dim", d.head_dim)?;
    check_len(
        OP,
        "q [tokens, q_heads, head_dim]",
        q.len(),
        d.tokens * d.q_heads * d.head_dim,
    )?;
    check_len(
        OP,
        "k [tokens, kv_heads, head_dim]",
        k.len(),
        d.tokens * d.kv_heads * d.head_dim,
    )?;
    check_len(OP, "positions [tokens]", positions.len(), d.tokens)?;
    if !VARIANTS.contains(&variant) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("variant `{variant}` (known: {})", VARIANTS.join(", ")),
        });
    }
    if d.tokens == 0 {
        return Ok(());
    }
    let tokens = i32::try_from(d.tokens)
        .map_err(|_| KernelError::shape(OP, "tokens", "<= 2^31 - 1", d.tokens))?;
    let pairs = (d.q_heads + d.kv_heads) * d.head_dim / 2;
    let max_pos = table.max_positions as i32;
    let vec = 16 / std::mem::size_of::<T>();
    // v3's block holds one thread per 16-byte chunk of a token's heads.
    let per_token = (d.q_heads + d.kv_heads) * d.head_dim / 2 / vec;
    let v3 = (variant == "v3" || variant == "v4")
        && (d.head_dim / 2) % vec == 0
        && per_token <= 1024
        && all_aligned16(gpu, &[&*q as &dyn KernelArg, &*k, &table.data]);
    let (name, c) = if variant == "v1" {
        let c = cfg(
            (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
            threads_for(pairs, 512),
        );
        ("rope".to_string(), c)
    } else if v3 {
        // v3: about 256 threads a block, R tokens of per_token threads
        // each. v4 up to SPLIT_TOKENS: blocks of at most 128 threads, a
        // token's chunks spread over grid.y when it has more; above, v3's.
        let split = variant == "v4" && d.tokens <= SPLIT_TOKENS;
        let c = token_columns(OP, d.tokens, per_token, split)?;
        (format!("rope_{variant}"), c)
    } else {
        // v2, and v3's shapes that need the scalar path.
        let work = (d.tokens * pairs).div_ceil(vec);
        let blocks = work
            .div_ceil(256)
            .clamp(1, gpu.info().sm_count.max(1) as usize * 16) as u32;
        ("rope_v2".to_string(), cfg((blocks, 1, 1), 256))
    };
    let f = typed_function::<T>(gpu, "rope", &name)?;
    let stream = gpu.stream();
    let mut args = stream.launch_builder(&f);
    args.arg(q)
        .arg(k)
        .arg(positions)
        .arg(&table.data)
        .arg(&max_pos);
    // v1 is one block a token and takes no token count.
    if name != "rope" {
        args.arg(&tokens);
    }
    args.arg(&q_heads).arg(&kv_heads).arg(&head_dim);
    // SAFETY: q, k and positions have the lengths checked above; positions are
    // range-checked on the device against max_pos before the table is read;
    // v2's grid-stride loop stops at tokens * heads * pairs; v3's threads stop
    // at t >= tokens and cover exactly heads * chunks per token (v4 masks
    // the last column block's overhang).
    unsafe { args.launch(c) }.map_err(KernelError::driver(format!("launch rope {variant}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_rows_are_cos_then_sin() {
        let t = super::cos_sin_table(3, 4, 10000.0);
        // position 0: cos 1, sin 0
        assert_eq!(&t[0..4], &[1.0, 1.0, 0.0, 0.0]);
        // position 2, i = 0: angle 2 rad
        assert!((t[8] - 2f64.cos() as f32).abs() < 1e-7);
        assert!((t[10] - 2f64.sin() as f32).abs() < 1e-7);
    }
}
