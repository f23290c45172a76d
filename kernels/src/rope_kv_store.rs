//! Launcher for `cuda/rope_kv_store.cu`: RoPE on q and k, then k and v into
//! the paged cache, in one pass.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{all_aligned16, cfg, token_columns, typed_function, KernelArg, SPLIT_TOKENS};
use crate::rope::RopeTable;
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

const OP: &str = "rope_kv_store";

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2"];
pub const PRODUCTION: &str = "v2";

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

/// What both launchers check and compute alike: the table matches, the
/// caches, positions and slots have their lengths, and the grid for
/// `tokens * (q_heads + 2 kv_heads) * head_dim / 2` rotation pairs in 16-byte
/// vectors. `None` when there are no tokens.
struct Launch {
    q_heads: i32,
    kv_heads: i32,
    head_dim: i32,
    tokens: i32,
    max_pos: i32,
    num_slots: i64,
    /// The kernel's base name with its variant suffix, and its launch shape.
    name: &'static str,
    config: LaunchConfig,
}

impl Launch {
    /// `v2_buffers`: the data buffers v2 reads and writes with 16-byte
    /// vectors (all must be aligned, else v1 runs).
    #[allow(clippy::too_many_arguments)]
    fn prepare<T: Storage>(
        op: &'static str,
        gpu: &Gpu,
        table: &RopeTable,
        d: RopeKvStoreDims,
        k_cache: &CudaViewMut<T>,
        v_cache: &CudaViewMut<T>,
        positions: &CudaView<i32>,
        slot_mapping: &CudaView<i64>,
        variant: &str,
        v2_buffers: &[&dyn KernelArg],
    ) -> Result<Option<Self>> {
        if !VARIANTS.contains(&variant) {
            return Err(KernelError::Unsupported {
                op,
                what: format!("variant `{variant}` (known: {})", VARIANTS.join(", ")),
            });
        }
        if table.head_dim != d.head_dim {
            return Err(KernelError::shape(
                op,
                "table head_dim",
                d.head_dim,
                table.head_dim,
            ));
        }
        let q_heads = dim_i32(op, "q_heads", d.q_heads)?;
        let kv_heads = dim_i32(op, "kv_heads", d.kv_heads)?;
        let head_dim = dim_i32(op, "head_dim", d.head_dim)?;
        dim_i32(op, "block_size", d.block_size)?;
        let cache = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
        check_len(
            op,
            "k_cache [num_blocks, block_size, kv_heads, head_dim]",
            k_cache.len(),
            cache,
        )?;
        check_len(
            op,
            "v_cache [num_blocks, block_size, kv_heads, head_dim]",
            v_cache.len(),
            cache,
        )?;
        check_len(op, "positions [tokens]", positions.len(), d.tokens)?;
        check_len(op, "slot_mapping [tokens]", slot_mapping.len(), d.tokens)?;
        if d.tokens == 0 {
            return Ok(None);
        }
        let tokens = i32::try_from(d.tokens)
            .map_err(|_| KernelError::shape(op, "tokens", "<= 2^31 - 1", d.tokens))?;
        let vec = 16 / std::mem::size_of::<T>();
        // v2: one thread per rotation chunk of q and k, then per v vector.
        let per_token =
            (d.q_heads + d.kv_heads) * (d.head_dim / 2 / vec) + d.kv_heads * d.head_dim / vec;
        let v2 = variant == "v2"
            && (d.head_dim / 2) % vec == 0
            && per_token <= 1024
            && all_aligned16(gpu, v2_buffers)
            && all_aligned16(gpu, &[&table.data as &dyn KernelArg, k_cache, v_cache]);
        let (name, config) = if v2 {
            // rope.cu v4's launch.
            let split = d.tokens <= SPLIT_TOKENS;
            ("v2", token_columns(op, d.tokens, per_token, split)?)
        } else {
            let work = (d.tokens * (d.q_heads + 2 * d.kv_heads) * d.head_dim / 2).div_ceil(vec);
            let blocks = work
                .div_ceil(256)
                .clamp(1, gpu.info().sm_count.max(1) as usize * 16) as u32;
            ("v1", cfg((blocks, 1, 1), 256))
        };
        Ok(Some(Self {
            q_heads,
            kv_heads,
            head_dim,
            tokens,
            max_pos: table.max_positions as i32,
            num_slots: (d.num_blocks * d.block_size) as i64,
            name,
            config,
        }))
    }
}

/// q [tokens, q_heads, d] rotated in place; rotated k and v [tokens,
/// kv_heads, d] written to the caches [num_blocks, block_size, kv_heads, d].
pub fn rope_kv_store<T: Storage>(
    gpu: &Gpu,
    a: RopeKvStoreArgs<'_, '_, T>,
    table: &RopeTable,
    d: RopeKvStoreDims,
    variant: &str,
) -> Result<()> {
    let kv = d.tokens * d.kv_heads * d.head_dim;
    check_len(
        OP,
        "q [tokens, q_heads, head_dim]",
        a.q.len(),
        d.tokens * d.q_heads * d.head_dim,
    )?;
    check_len(OP, "k [tokens, kv_heads, head_dim]", a.k.len(), kv)?;
    check_len(OP, "v [tokens, kv_heads, head_dim]", a.v.len(), kv)?;
    let Some(l) = Launch::prepare(
        OP,
        gpu,
        table,
        d,
        a.k_cache,
        a.v_cache,
        a.positions,
        a.slot_mapping,
        variant,
        &[&*a.q, a.k, a.v],
    )?
    else {
        return Ok(());
    };
    let name = if l.name == "v2" {
        "rope_kv_store_v2"
    } else {
        "rope_kv_store"
    };
    let f = typed_function::<T>(gpu, "rope_kv_store", name)?;
    let Launch {
        q_heads,
        kv_heads,
        head_dim,
        tokens,
        max_pos,
        num_slots,
        config,
        ..
    } = l;
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
            .launch(config)
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
    variant: &str,
) -> Result<()> {
    const OP: &str = "qkv_rope_kv_store";
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
    let Some(l) = Launch::prepare(
        OP,
        gpu,
        table,
        d,
        a.k_cache,
        a.v_cache,
        a.positions,
        a.slot_mapping,
        variant,
        &[&*a.q_out, a.qkv, a.bias],
    )?
    else {
        return Ok(());
    };
    let name = if l.name == "v2" {
        "qkv_rope_kv_store_v2"
    } else {
        "qkv_rope_kv_store"
    };
    let f = typed_function::<T>(gpu, "rope_kv_store", name)?;
    let Launch {
        q_heads,
        kv_heads,
        head_dim,
        tokens,
        max_pos,
        num_slots,
        config,
        ..
    } = l;
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
            .launch(config)
    }
    .map_err(KernelError::driver("launch qkv_rope_kv_store"))?;
    Ok(())
}
