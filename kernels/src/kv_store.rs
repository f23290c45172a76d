//! Launcher for `cuda/kv_store.cu`: scatter new k/v rows into the paged cache.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, Result};
use crate::launch::{all_aligned16, cfg, grid_u32, threads_for, typed_function, KernelArg};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

const OP: &str = "kv_store";

#[derive(Clone, Copy, Debug)]
pub struct KvStoreDims {
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2", "v3"];
pub const PRODUCTION: &str = "v3";

/// k, v [tokens, kv_heads, head_dim] -> caches [num_blocks, block_size,
/// kv_heads, head_dim] at slot_mapping [tokens] (i64; negative = skip).
#[allow(clippy::too_many_arguments)]
pub fn kv_store<T: Storage>(
    gpu: &Gpu,
    k_cache: &mut CudaViewMut<T>,
    v_cache: &mut CudaViewMut<T>,
    k: &CudaView<T>,
    v: &CudaView<T>,
    slot_mapping: &CudaView<i64>,
    d: KvStoreDims,
    variant: &str,
) -> Result<()> {
    dim_i32(OP, "kv_heads", d.kv_heads)?;
    dim_i32(OP, "head_dim", d.head_dim)?;
    dim_i32(OP, "block_size", d.block_size)?;
    let row = dim_i32(OP, "kv_heads*head_dim", d.kv_heads * d.head_dim)?;
    let rows = d.tokens * d.kv_heads * d.head_dim;
    check_len(OP, "k [tokens, kv_heads, head_dim]", k.len(), rows)?;
    check_len(OP, "v [tokens, kv_heads, head_dim]", v.len(), rows)?;
    check_len(OP, "slot_mapping [tokens]", slot_mapping.len(), d.tokens)?;
    let cache = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
    check_len(
        OP,
        "k_cache [num_blocks, block_size, kv_heads, head_dim]",
        k_cache.len(),
        cache,
    )?;
    check_len(
        OP,
        "v_cache [num_blocks, block_size, kv_heads, head_dim]",
        v_cache.len(),
        cache,
    )?;
    if !VARIANTS.contains(&variant) {
        return Err(crate::KernelError::Unsupported {
            op: OP,
            what: format!("variant `{variant}` (known: {})", VARIANTS.join(", ")),
        });
    }
    if d.tokens == 0 {
        return Ok(());
    }
    let num_slots = (d.num_blocks * d.block_size) as i64;
    let vec = 16 / std::mem::size_of::<T>();
    let per_row = row as usize / vec;
    let v3 = variant == "v3"
        && row as usize % vec == 0
        && per_row <= 1024
        && i32::try_from(d.tokens).is_ok()
        && all_aligned16(gpu, &[&*k_cache as &dyn KernelArg, &*v_cache, k, v]);
    // The variants take the same arguments but for the token count: v1 has
    // none (one block a token), v2 an i64 (grid-stride loop), v3 an i32.
    let tokens_i64 = d.tokens as i64;
    let tokens_i32 = d.tokens as i32;
    let (name, c) = if v3 {
        // About 128 threads a block: R tokens of per_row threads each.
        let rows = (128 / per_row).max(1);
        let c = LaunchConfig {
            grid_dim: (grid_u32(OP, "tokens", d.tokens.div_ceil(rows))?, 1, 1),
            block_dim: (per_row as u32, rows as u32, 1),
            shared_mem_bytes: 0,
        };
        ("kv_store_v3", c)
    } else if variant != "v2" {
        // v1, and v3's shapes that need the scalar path.
        let c = cfg(
            (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
            threads_for((row as usize).div_ceil(vec), 256),
        );
        ("kv_store", c)
    } else {
        let work = (d.tokens * row as usize).div_ceil(vec);
        let blocks = work
            .div_ceil(256)
            .clamp(1, gpu.info().sm_count.max(1) as usize * 16) as u32;
        ("kv_store_v2", cfg((blocks, 1, 1), 256))
    };
    let f = typed_function::<T>(gpu, "kv_store", name)?;
    let stream = gpu.stream();
    let mut args = stream.launch_builder(&f);
    args.arg(k_cache)
        .arg(v_cache)
        .arg(k)
        .arg(v)
        .arg(slot_mapping)
        .arg(&num_slots);
    match name {
        "kv_store_v3" => args.arg(&tokens_i32),
        "kv_store_v2" => args.arg(&tokens_i64),
        _ => &mut args,
    };
    args.arg(&row);
    // SAFETY: lengths checked above; the kernels skip slots outside
    // [0, num_slots); v2's grid-stride loop stops at tokens * row; v3's
    // threads stop at t >= tokens and cover one row's vectors exactly.
    unsafe { args.launch(c) }.map_err(crate::KernelError::driver(format!(
        "launch kv_store {variant}"
    )))?;
    Ok(())
}
