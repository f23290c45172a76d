//! Launcher for `cuda/kv_store.cu`: scatter new k/v rows into the paged cache.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, Result};
use crate::launch::{cfg, grid_u32, threads_for, typed_function};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

const OP: &str = "kv_store";

#[derive(Clone, Copy, Debug)]
pub struct KvStoreDims {
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// k, v [tokens, kv_heads, head_dim] -> caches [num_blocks, block_size,
/// kv_heads, head_dim] at slot_mapping [tokens] (i64; negative = skip).
pub fn kv_store<T: Storage>(
    gpu: &Gpu,
    k_cache: &mut CudaViewMut<T>,
    v_cache: &mut CudaViewMut<T>,
    k: &CudaView<T>,
    v: &CudaView<T>,
    slot_mapping: &CudaView<i64>,
    d: KvStoreDims,
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
    if d.tokens == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "kv_store", "kv_store")?;
    let num_slots = (d.num_blocks * d.block_size) as i64;
    let vec = 16 / std::mem::size_of::<T>();
    // SAFETY: lengths checked above; the kernel skips slots outside [0, num_slots).
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(k_cache)
            .arg(v_cache)
            .arg(k)
            .arg(v)
            .arg(slot_mapping)
            .arg(&num_slots)
            .arg(&row)
            .launch(cfg(
                (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
                threads_for((row as usize).div_ceil(vec), 256),
            ))
    }
    .map_err(crate::KernelError::driver("launch kv_store"))?;
    Ok(())
}
