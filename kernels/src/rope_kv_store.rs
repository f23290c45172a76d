//! Launcher for `cuda/rope_kv_store.cu`: RoPE on q and k, then k and v into
//! the paged cache, in one pass.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{cfg, typed_function};
use crate::rope::RopeTable;
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

const OP: &str = "rope_kv_store";

#[derive(Clone, Copy, Debug)]
pub struct RopeKvStoreDims {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// Buffers of one call: q is rotated in place; k and v are read; the caches
/// receive rotated k and v at `slot_mapping`.
pub struct RopeKvStoreArgs<'a, 'b, T> {
    pub q: &'a mut CudaViewMut<'b, T>,
    pub k: &'a CudaView<'b, T>,
    pub v: &'a CudaView<'b, T>,
    pub k_cache: &'a mut CudaViewMut<'b, T>,
    pub v_cache: &'a mut CudaViewMut<'b, T>,
    pub positions: &'a CudaView<'b, i32>,
    pub slot_mapping: &'a CudaView<'b, i64>,
}

/// q [tokens, q_heads, d] rotated in place; rotated k and v [tokens,
/// kv_heads, d] written to the caches [num_blocks, block_size, kv_heads, d].
pub fn rope_kv_store<T: Storage>(
    gpu: &Gpu,
    a: RopeKvStoreArgs<'_, '_, T>,
    table: &RopeTable,
    d: RopeKvStoreDims,
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
    dim_i32(OP, "block_size", d.block_size)?;
    let kv = d.tokens * d.kv_heads * d.head_dim;
    check_len(
        OP,
        "q [tokens, q_heads, head_dim]",
        a.q.len(),
        d.tokens * d.q_heads * d.head_dim,
    )?;
    check_len(OP, "k [tokens, kv_heads, head_dim]", a.k.len(), kv)?;
    check_len(OP, "v [tokens, kv_heads, head_dim]", a.v.len(), kv)?;
    let cache = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
    check_len(
        OP,
        "k_cache [num_blocks, block_size, kv_heads, head_dim]",
        a.k_cache.len(),
        cache,
    )?;
    check_len(
        OP,
        "v_cache [num_blocks, block_size, kv_heads, head_dim]",
        a.v_cache.len(),
        cache,
    )?;
    check_len(OP, "positions [tokens]", a.positions.len(), d.tokens)?;
    check_len(OP, "slot_mapping [tokens]", a.slot_mapping.len(), d.tokens)?;
    if d.tokens == 0 {
        return Ok(());
    }
    let tokens = i32::try_from(d.tokens)
        .map_err(|_| KernelError::shape(OP, "tokens", "<= 2^31 - 1", d.tokens))?;
    let f = typed_function::<T>(gpu, "rope_kv_store", "rope_kv_store")?;
    let vec = 16 / std::mem::size_of::<T>();
    let work = (d.tokens * (d.q_heads + 2 * d.kv_heads) * d.head_dim / 2).div_ceil(vec);
    let blocks = work
        .div_ceil(256)
        .clamp(1, gpu.info().sm_count.max(1) as usize * 16) as u32;
    let (max_pos, num_slots) = (
        table.max_positions as i32,
        (d.num_blocks * d.block_size) as i64,
    );
    // SAFETY: every buffer length is checked above; positions are range-checked
    // on the device before the table is read and slots outside [0, num_slots)
    // are skipped; the grid-stride loops stop at the element counts.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(a.q)
            .arg(a.k)
            .arg(a.v)
            .arg(a.k_cache)
            .arg(a.v_cache)
            .arg(a.positions)
            .arg(&table.data)
            .arg(a.slot_mapping)
            .arg(&max_pos)
            .arg(&num_slots)
            .arg(&tokens)
            .arg(&q_heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .launch(cfg((blocks, 1, 1), 256))
    }
    .map_err(KernelError::driver("launch rope_kv_store"))?;
    Ok(())
}

/// Buffers of [`qkv_rope_kv_store`]: the fused projection and its bias in,
/// rotated q out, rotated k and v into the caches.
pub struct QkvRopeKvStoreArgs<'a, 'b, T> {
    /// [tokens, q_heads * d]
    pub q_out: &'a mut CudaViewMut<'b, T>,
    /// [tokens, (q_heads + 2 kv_heads) * d]: q | k | v per row.
    pub qkv: &'a CudaView<'b, T>,
    /// [(q_heads + 2 kv_heads) * d]
    pub bias: &'a CudaView<'b, T>,
    pub k_cache: &'a mut CudaViewMut<'b, T>,
    pub v_cache: &'a mut CudaViewMut<'b, T>,
    pub positions: &'a CudaView<'b, i32>,
    pub slot_mapping: &'a CudaView<'b, i64>,
}

/// The engine's path from its fused q|k|v projection: (q + bias) rotated
/// into `q_out`, (k + bias) rotated and (v + bias) written to the caches.
/// Bit-identical to `util::split_qkv_bias` then [`rope_kv_store`], in one
/// launch that reads the projection once.
pub fn qkv_rope_kv_store<T: Storage>(
    gpu: &Gpu,
    a: QkvRopeKvStoreArgs<'_, '_, T>,
    table: &RopeTable,
    d: RopeKvStoreDims,
) -> Result<()> {
    const OP: &str = "qkv_rope_kv_store";
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
    dim_i32(OP, "block_size", d.block_size)?;
    let row = (d.q_heads + 2 * d.kv_heads) * d.head_dim;
    check_len(
        OP,
        "q_out [tokens, q_heads, head_dim]",
        a.q_out.len(),
        d.tokens * d.q_heads * d.head_dim,
    )?;
    check_len(
        OP,
        "qkv [tokens, (q_heads + 2 kv_heads) * head_dim]",
        a.qkv.len(),
        d.tokens * row,
    )?;
    check_len(
        OP,
        "bias [(q_heads + 2 kv_heads) * head_dim]",
        a.bias.len(),
        row,
    )?;
    let cache = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
    check_len(
        OP,
        "k_cache [num_blocks, block_size, kv_heads, head_dim]",
        a.k_cache.len(),
        cache,
    )?;
    check_len(
        OP,
        "v_cache [num_blocks, block_size, kv_heads, head_dim]",
        a.v_cache.len(),
        cache,
    )?;
    check_len(OP, "positions [tokens]", a.positions.len(), d.tokens)?;
    check_len(OP, "slot_mapping [tokens]", a.slot_mapping.len(), d.tokens)?;
    if d.tokens == 0 {
        return Ok(());
    }
    let tokens = i32::try_from(d.tokens)
        .map_err(|_| KernelError::shape(OP, "tokens", "<= 2^31 - 1", d.tokens))?;
    let f = typed_function::<T>(gpu, "rope_kv_store", "qkv_rope_kv_store")?;
    let vec = 16 / std::mem::size_of::<T>();
    let work = (d.tokens * (d.q_heads + 2 * d.kv_heads) * d.head_dim / 2).div_ceil(vec);
    let blocks = work
        .div_ceil(256)
        .clamp(1, gpu.info().sm_count.max(1) as usize * 16) as u32;
    let (max_pos, num_slots) = (
        table.max_positions as i32,
        (d.num_blocks * d.block_size) as i64,
    );
    // SAFETY: every buffer length is checked above (qkv rows of q|k|v, the
    // bias row, q_out, the caches); positions are range-checked on the
    // device before the table is read, slots outside [0, num_slots) are
    // skipped, and the grid-stride loops stop at the element counts.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(a.q_out)
            .arg(a.qkv)
            .arg(a.bias)
            .arg(a.k_cache)
            .arg(a.v_cache)
            .arg(a.positions)
            .arg(&table.data)
            .arg(a.slot_mapping)
            .arg(&max_pos)
            .arg(&num_slots)
            .arg(&tokens)
            .arg(&q_heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .launch(cfg((blocks, 1, 1), 256))
    }
    .map_err(KernelError::driver("launch qkv_rope_kv_store"))?;
    Ok(())
}
