//! Launcher for `cuda/paged_attention.cu`: decode attention over the paged
//! KV cache (one query token per sequence).

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{cfg, grid_u32, typed_function};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

const OP: &str = "paged_attention";

#[derive(Clone, Copy, Debug)]
pub struct PagedAttentionDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_blocks_per_seq: usize,
    pub scale: f32,
}

impl PagedAttentionDims {
    fn validate(&self) -> Result<()> {
        if self.q_heads % self.kv_heads.max(1) != 0 {
            return Err(KernelError::Unsupported {
                op: OP,
                what: format!(
                    "q_heads {} not a multiple of kv_heads {}",
                    self.q_heads, self.kv_heads
                ),
            });
        }
        if self.head_dim > 256 {
            return Err(KernelError::Unsupported {
                op: OP,
                what: format!("head_dim {} (at most 256)", self.head_dim),
            });
        }
        Ok(())
    }
}

/// out [batch, q_heads, head_dim] = attention of q [batch, q_heads, head_dim]
/// over the first context_lens[b] tokens of sequence b, whose blocks are
/// block_tables [batch, max_blocks_per_seq]; caches [num_blocks, block_size,
/// kv_heads, head_dim].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
    block_tables: &CudaView<i32>,
    context_lens: &CudaView<i32>,
    d: PagedAttentionDims,
) -> Result<()> {
    let q_heads = dim_i32(OP, "q_heads", d.q_heads)?;
    let kv_heads = dim_i32(OP, "kv_heads", d.kv_heads)?;
    let head_dim = dim_i32(OP, "head_dim", d.head_dim)?;
    let block_size = dim_i32(OP, "block_size", d.block_size)?;
    let num_blocks = dim_i32(OP, "num_blocks", d.num_blocks)?;
    let mbps = dim_i32(OP, "max_blocks_per_seq", d.max_blocks_per_seq)?;
    d.validate()?;
    let qlen = d.batch * d.q_heads * d.head_dim;
    check_len(OP, "q [batch, q_heads, head_dim]", q.len(), qlen)?;
    check_len(OP, "out [batch, q_heads, head_dim]", out.len(), qlen)?;
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
    check_len(
        OP,
        "block_tables [batch, max_blocks_per_seq]",
        block_tables.len(),
        d.batch * d.max_blocks_per_seq,
    )?;
    check_len(OP, "context_lens [batch]", context_lens.len(), d.batch)?;
    if d.batch == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "paged_attention", "paged_attention_v1")?;
    let scale = d.scale;
    // SAFETY: every buffer length is checked above. Context lengths live on the
    // device: the kernel treats one outside [0, max_blocks_per_seq * block_size]
    // as bad (NaN output, nothing read) and range-checks every block id.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(out)
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(block_tables)
            .arg(context_lens)
            .arg(&scale)
            .arg(&q_heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&block_size)
            .arg(&mbps)
            .arg(&num_blocks)
            .launch(cfg(
                (q_heads as u32, grid_u32(OP, "batch", d.batch)?, 1),
                128,
            ))
    }
    .map_err(KernelError::driver("launch paged_attention"))?;
    Ok(())
}
