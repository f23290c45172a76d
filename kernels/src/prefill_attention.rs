//! Launcher for `cuda/prefill_attention.cu`: causal attention of packed
//! variable-length prefills (or prefill chunks after a cached prefix) over
//! the paged KV cache, on tensor cores, bf16/f16 storage: mma.sync (v1-v4)
//! and, on sm_90a, Hopper's warpgroup MMA (v5-v8; [`kernel_for`] picks).

use crate::device::Gpu;
use crate::dtype::{DType, Storage};
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{grid_u32, typed_function};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

const OP: &str = "prefill_attention";

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8"];
/// The variants on warpgroup MMA (sm_90a, unpadded swizzled tiles); where
/// they have no kernel they run v3's choice.
const WGMMA_VARIANTS: &[&str] = &["v5", "v6", "v7", "v8"];
pub const PRODUCTION: &str = "v8";

/// Query rows per block (4 warps x 16, the smallest tile: v1) and threads
/// per block (prefill_attention.cu).
const BLOCK_M: usize = 64;
const THREADS: u32 = 128;

/// v2's tiles: 128 query rows a block (4 warps x 2 x 16), so each K and V
/// fragment feeds two MMAs, and 32 keys a tile (64 would not fit the
/// registers). Head dims without a v2 kernel run v1.
pub const V2_HEAD_DIMS: &[usize] = &[64, 96, 128];
const V2_BLOCK_M: usize = 128;
const V2_TILE_N: usize = 32;
/// v3: v2's tiles (64 keys a tile for head dim 64) with fewer instructions
/// beside the MMAs; it needs a power-of-two block_size (a shift, not a
/// division, per chunk). Other shapes run v2 (or v1).
pub const V3_TILES: &[(usize, usize)] = &[(64, 64), (96, 32), (128, 32)];
/// v4: v3's savings on v1's tiles (64 query rows, 64 keys); power-of-two
/// block sizes, others run v1.
pub const V4_HEAD_DIMS: &[usize] = &[64, 96, 128];
/// v5: warpgroup MMA (wgmma) on sm_90a, 2 warpgroups of 128 threads and 128
/// query rows a block, tiles in wgmma's no-swizzle layout (no padding); the
/// keys per tile by head dim. Power-of-two block sizes; other shapes and
/// other GPUs run v3's choice.
pub const V5_TILES: &[(usize, usize)] = &[(64, 128), (128, 128)];
const V5_BLOCK_M: usize = 128;
const V5_THREADS: u32 = 256;
/// v6: v5 with FlashAttention-3's intra-warpgroup overlap (S of tile j+1
/// and the softmax of tile j+1 beside P V of tile j) on three K/V stages;
/// 128-key tiles, head dim 128 only: at 64 its wgmma kernel ran 0.90-0.94x
/// v3's on the H100 (2026-11-26), so head dim 64 runs v3's kernel. Same
/// fallbacks as v5.
pub const V6_TILES: &[(usize, usize)] = &[(128, 128)];
/// v7: v5's tiles with the two warpgroups in ping-pong (warpgroup 1 half a
/// tile behind, so one's softmax runs beside the other's MMAs); three K/V
/// stages. Same fallbacks as v5.
pub const V7_TILES: &[(usize, usize)] = &[(64, 128), (128, 128)];
/// v8: v5's schedule at head dim 64 on 64-key tiles with registers capped
/// at 128 a thread, so two blocks (4 warpgroups) share an SM: v7's
/// head-dim-64 kernel holds 254 registers and one block of 8 warps an SM,
/// and its issue slots sat half idle (CHALLENGES #30). Two K/V stages.
/// Head dim 128 runs v7's kernel; other fallbacks as v5.
pub const V8_TILES: &[(usize, usize)] = &[(64, 64)];
/// The NVRTC target v5-v8 are compiled for (wgmma is sm_90a only).
pub const V5_ARCH: &str = "sm_90a";
/// Grid y and z are 16-bit on the device.
const GRID_YZ_MAX: usize = 65535;

/// The head dims with a compiled kernel and the keys per tile each uses
/// (the `PF_ENTRIES` table of prefill_attention.cu).
pub const HEAD_DIMS: &[(usize, usize)] = &[(64, 64), (80, 64), (96, 64), (128, 64), (256, 32)];

/// Dynamic shared memory of one block: the Q tile of `block_m` rows, two K
/// and two V tiles (rows padded by 8 elements) and two tiles of bad-block
/// flags (i32).
pub fn shared_bytes(head_dim: usize, tile_n: usize, block_m: usize) -> usize {
    let ld = head_dim + 8;
    2 * (block_m * ld + 4 * tile_n * ld) + 4 * 2 * tile_n
}

/// The compiled kernel one launch runs (see [`kernel_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfKernel {
    /// The variant of its entry point (`prefill_attention_{name}_d{D}_{dtype}`).
    pub name: &'static str,
    /// Keys per tile.
    pub tile_n: usize,
    /// Query rows per block.
    pub block_m: usize,
    pub threads: u32,
    /// K/V tiles in flight or in use (shared-memory stages).
    pub stages: usize,
}

impl PfKernel {
    /// Dynamic shared memory of one block for `head_dim`: the wgmma variants'
    /// (v5-v8) tiles are unpadded (Q, K and V tiles per stage, flags, 1 KB to
    /// align them); the others' rows carry 8 elements of padding
    /// ([`shared_bytes`]).
    pub fn shared_bytes(&self, head_dim: usize) -> usize {
        if WGMMA_VARIANTS.contains(&self.name) {
            // + 1 KB: the kernel aligns its swizzled tiles to 1024 bytes.
            let (m, n, st) = (self.block_m, self.tile_n, self.stages);
            2 * (m * head_dim + 2 * st * n * head_dim) + 4 * st * n + 1024
        } else {
            shared_bytes(head_dim, self.tile_n, self.block_m)
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PrefillAttentionDims {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query rows of all sequences (the last entry of cu_seqlens_q).
    pub total_q: usize,
    /// The longest sequence's query count: sizes the grid. A smaller value
    /// is still correct (each block loops over its tiles), only slower.
    pub max_q_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_blocks_per_seq: usize,
    /// Softmax scale (usually 1/sqrt(head_dim)); finite and > 0.
    pub scale: f32,
}

impl PrefillAttentionDims {
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
        v1_tile_n(self.head_dim)?; // a compiled head_dim
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(KernelError::Unsupported {
                op: OP,
                what: format!("softmax scale {} (must be finite and > 0)", self.scale),
            });
        }
        if self.max_q_len > self.total_q {
            return Err(KernelError::shape(
                OP,
                "max_q_len",
                format!("<= total_q ({})", self.total_q),
                self.max_q_len,
            ));
        }
        // The kernel compares kv_len with max_blocks_per_seq * block_size in i64,
        // but token indices are i32.
        if self.max_blocks_per_seq.saturating_mul(self.block_size) > i32::MAX as usize {
            return Err(KernelError::shape(
                OP,
                "max_blocks_per_seq * block_size",
                "<= 2^31 - 1 tokens per sequence",
                self.max_blocks_per_seq.saturating_mul(self.block_size),
            ));
        }
        if self.batch > GRID_YZ_MAX {
            return Err(KernelError::shape(
                OP,
                "batch",
                format!("<= {GRID_YZ_MAX} (grid y)"),
                self.batch,
            ));
        }
        if self.max_q_len.div_ceil(BLOCK_M) > GRID_YZ_MAX {
            return Err(KernelError::shape(
                OP,
                "max_q_len",
                format!("<= {} (grid z of 64-row tiles)", GRID_YZ_MAX * BLOCK_M),
                self.max_q_len,
            ));
        }
        Ok(())
    }
}

/// out [total_q, q_heads, head_dim] = causal attention of q [total_q,
/// q_heads, head_dim] (sequence b owns rows cu_seqlens_q[b]..cu_seqlens_q[b+1])
/// over the first kv_lens[b] tokens of sequence b in the caches [num_blocks,
/// block_size, kv_heads, head_dim] through block_tables [batch,
/// max_blocks_per_seq]. The new tokens are the last q_len of each context:
/// query i sits at position kv_lens[b] - q_len + i.
///
/// bf16 and f16 only (tensor cores); f32 storage is Unsupported.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
    cu_seqlens_q: &CudaView<i32>,
    kv_lens: &CudaView<i32>,
    block_tables: &CudaView<i32>,
    d: PrefillAttentionDims,
    variant: &str,
) -> Result<()> {
    if T::DTYPE == DType::F32 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: "f32 storage (the tensor-core kernel takes bf16 or f16)".into(),
        });
    }
    let q_heads = dim_i32(OP, "q_heads", d.q_heads)?;
    let kv_heads = dim_i32(OP, "kv_heads", d.kv_heads)?;
    dim_i32(OP, "head_dim", d.head_dim)?; // a template argument of the kernel, not a parameter
    let block_size = dim_i32(OP, "block_size", d.block_size)?;
    let num_blocks = dim_i32(OP, "num_blocks", d.num_blocks)?;
    let mbps = dim_i32(OP, "max_blocks_per_seq", d.max_blocks_per_seq)?;
    let total_q = i32::try_from(d.total_q)
        .map_err(|_| KernelError::shape(OP, "total_q", "<= 2^31 - 1", d.total_q))?;
    d.validate()?;
    let qlen = d.total_q * d.q_heads * d.head_dim;
    check_len(OP, "q [total_q, q_heads, head_dim]", q.len(), qlen)?;
    check_len(OP, "out [total_q, q_heads, head_dim]", out.len(), qlen)?;
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
        "cu_seqlens_q [batch + 1]",
        cu_seqlens_q.len(),
        d.batch + 1,
    )?;
    check_len(OP, "kv_lens [batch]", kv_lens.len(), d.batch)?;
    check_len(
        OP,
        "block_tables [batch, max_blocks_per_seq]",
        block_tables.len(),
        d.batch * d.max_blocks_per_seq,
    )?;
    if !VARIANTS.contains(&variant) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("variant `{variant}` (known: {})", VARIANTS.join(", ")),
        });
    }
    if d.batch == 0 || d.total_q == 0 {
        return Ok(());
    }
    if d.max_q_len == 0 {
        return Err(KernelError::shape(
            OP,
            "max_q_len",
            ">= 1 when total_q > 0",
            0,
        ));
    }
    let kernel = kernel_on(gpu, variant, d.head_dim, d.block_size)?;
    let smem = kernel.shared_bytes(d.head_dim);
    let f = typed_function::<T>(
        gpu,
        "prefill_attention",
        &format!("prefill_attention_{}_d{}", kernel.name, d.head_dim),
    )?;
    if smem > 48 * 1024 {
        // Above 48 KB a kernel must opt in to dynamic shared memory (A100:
        // up to 163 KB per block, H100: 227 KB; the largest here is v5's
        // ~97 KB, v1-v4's ~99 KB).
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(KernelError::driver("set prefill_attention shared memory"))?;
    }
    let grid = (
        q_heads as u32,
        grid_u32(OP, "batch", d.batch)?,
        grid_u32(
            OP,
            "max_q_len / rows per block",
            d.max_q_len.div_ceil(kernel.block_m),
        )?,
    );
    let scale = d.scale;
    // SAFETY: every buffer length is checked above against the dims passed to
    // the kernel. Offsets and lengths live on the device: the kernel clamps
    // each sequence's rows into [0, total_q], treats out-of-order offsets, a
    // kv_len below the query count or beyond max_blocks_per_seq * block_size,
    // and misaligned pointers as bad input (NaN rows, nothing read), and
    // range-checks every block id before reading a slot. Shared memory is
    // sized by `shared_bytes` for this head_dim, as the kernel lays it out.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(out)
            .arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(cu_seqlens_q)
            .arg(kv_lens)
            .arg(block_tables)
            .arg(&scale)
            .arg(&total_q)
            .arg(&q_heads)
            .arg(&kv_heads)
            .arg(&block_size)
            .arg(&mbps)
            .arg(&num_blocks)
            .launch(LaunchConfig {
                grid_dim: grid,
                block_dim: (kernel.threads, 1, 1),
                shared_mem_bytes: smem as u32,
            })
    }
    .map_err(KernelError::driver("launch prefill_attention"))?;
    Ok(())
}

/// The compiled kernel a (variant, head_dim, block_size) runs on `gpu`: the
/// launcher's choice, for callers that report it (the e2e header).
pub fn kernel_on(gpu: &Gpu, variant: &str, head_dim: usize, block_size: usize) -> Result<PfKernel> {
    kernel_for(variant, head_dim, block_size, gpu.info().arch == V5_ARCH)
}

/// The compiled kernel a (variant, head_dim, block_size) runs on a GPU with
/// (`hopper`) or without sm_90a's wgmma. A shape a variant has no kernel for
/// runs the variant it builds on: v5 needs sm_90a, a power-of-two block size
/// and head dim 64/128 (else v3's choice), v6-v8 the same (v6 and v8 have
/// one head dim each: v6's other runs v3's choice, v8's runs v7); v3 a
/// power-of-two block size and head dim 64/96/128 (else v2, else v1), v4 the
/// same (else v1), v2 head dim 64/96/128 (else v1). Unknown head dims are
/// Unsupported.
pub fn kernel_for(
    variant: &str,
    head_dim: usize,
    block_size: usize,
    hopper: bool,
) -> Result<PfKernel> {
    let pow2 = block_size.is_power_of_two();
    let v2 = V2_HEAD_DIMS.contains(&head_dim);
    let k = |name, tile_n, block_m| PfKernel {
        name,
        tile_n,
        block_m,
        threads: THREADS,
        stages: 2,
    };
    let wgmma = |name, tiles: &[(usize, usize)], stages| {
        tiles
            .iter()
            .find(|(dim, _)| *dim == head_dim)
            .map(|&(_, n)| PfKernel {
                threads: V5_THREADS,
                stages,
                ..k(name, n, V5_BLOCK_M)
            })
    };
    if hopper && pow2 {
        let kernel = match variant {
            "v5" => wgmma("v5", V5_TILES, 2),
            "v6" => wgmma("v6", V6_TILES, 3),
            "v7" => wgmma("v7", V7_TILES, 3),
            "v8" => wgmma("v8", V8_TILES, 2).or_else(|| wgmma("v7", V7_TILES, 3)),
            _ => None,
        };
        if let Some(kernel) = kernel {
            return Ok(kernel);
        }
    }
    if variant == "v4" && pow2 && V4_HEAD_DIMS.contains(&head_dim) {
        return Ok(k("v4", 64, BLOCK_M));
    }
    let v3_based = variant == "v3" || WGMMA_VARIANTS.contains(&variant);
    if v3_based && pow2 {
        if let Some(&(_, n)) = V3_TILES.iter().find(|(dim, _)| *dim == head_dim) {
            return Ok(k("v3", n, V2_BLOCK_M));
        }
    }
    if (variant == "v2" || v3_based) && v2 {
        return Ok(k("v2", V2_TILE_N, V2_BLOCK_M));
    }
    Ok(k("v1", v1_tile_n(head_dim)?, BLOCK_M))
}

/// v1's keys per tile for a head_dim (the `PF_ENTRIES` table), or
/// Unsupported naming the compiled head dims.
fn v1_tile_n(head_dim: usize) -> Result<usize> {
    HEAD_DIMS
        .iter()
        .find(|(d, _)| *d == head_dim)
        .map(|(_, n)| *n)
        .ok_or_else(|| KernelError::Unsupported {
            op: OP,
            what: format!(
                "head_dim {head_dim} (compiled for {})",
                HEAD_DIMS
                    .iter()
                    .map(|(d, _)| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_an_a100_block() {
        for &(d, n) in HEAD_DIMS {
            let s = shared_bytes(d, n, BLOCK_M);
            assert!(s <= 163 * 1024, "head_dim {d}: {s} bytes");
            assert_eq!(s % 16, 0);
        }
        for &d in V2_HEAD_DIMS {
            let s = shared_bytes(d, V2_TILE_N, V2_BLOCK_M);
            assert!(s <= 163 * 1024, "v2 head_dim {d}: {s} bytes");
            assert_eq!(s % 16, 0);
        }
        // d128: Q 64 x 136 + 4 tiles of 64 x 136 bf16, plus 2 x 64 flags.
        assert_eq!(
            shared_bytes(128, 64, 64),
            2 * (64 * 136 + 4 * 64 * 136) + 512
        );
    }

    #[test]
    fn each_variant_runs_its_kernel_or_the_one_it_builds_on() {
        let k = |v: &str, d: usize, bs: usize, hopper: bool| {
            let k = kernel_for(v, d, bs, hopper).unwrap();
            (k.name, k.tile_n, k.block_m)
        };
        for hopper in [false, true] {
            assert_eq!(k("v1", 128, 16, hopper), ("v1", 64, 64));
            assert_eq!(k("v2", 128, 16, hopper), ("v2", 32, 128));
            assert_eq!(k("v3", 128, 16, hopper), ("v3", 32, 128));
            assert_eq!(k("v3", 64, 32, hopper), ("v3", 64, 128));
            assert_eq!(k("v4", 96, 8, hopper), ("v4", 64, 64));
            // Block sizes that are not powers of two: v3 -> v2, v4 -> v1, v5 -> v2.
            assert_eq!(k("v3", 128, 24, hopper), ("v2", 32, 128));
            assert_eq!(k("v4", 128, 24, hopper), ("v1", 64, 64));
            assert_eq!(k("v5", 128, 24, hopper), ("v2", 32, 128));
            // Head dims without a v2/v3/v4 kernel run v1.
            assert_eq!(k("v3", 80, 16, hopper), ("v1", 64, 64));
            assert_eq!(k("v4", 256, 16, hopper), ("v1", 32, 64));
            assert_eq!(k("v5", 256, 16, hopper), ("v1", 32, 64));
            // v5's head dims without a v5 kernel run v3.
            assert_eq!(k("v5", 96, 16, hopper), ("v3", 32, 128));
            assert!(kernel_for("v3", 72, 16, hopper).is_err());
        }
        // v5 only where wgmma is: elsewhere v3's kernel.
        assert_eq!(k("v5", 128, 16, true), ("v5", 128, 128));
        assert_eq!(k("v5", 64, 16, true), ("v5", 128, 128));
        assert_eq!(k("v5", 128, 16, false), ("v3", 32, 128));
        assert_eq!(kernel_for("v5", 64, 16, true).unwrap().threads, 256);
        assert_eq!(k("v6", 128, 16, true), ("v6", 128, 128));
        assert_eq!(k("v6", 128, 16, false), ("v3", 32, 128));
        assert_eq!(k("v6", 64, 24, true), ("v2", 32, 128));
        assert_eq!(k("v6", 64, 16, true), ("v3", 64, 128));
        assert_eq!(kernel_for("v6", 128, 16, true).unwrap().stages, 3);
        assert_eq!(k("v7", 64, 16, true), ("v7", 128, 128));
        assert_eq!(k("v7", 128, 16, false), ("v3", 32, 128));
        assert_eq!(kernel_for("v7", 64, 16, true).unwrap().stages, 3);
        assert_eq!(k("v8", 64, 16, true), ("v8", 64, 128));
        assert_eq!(k("v8", 128, 16, true), ("v7", 128, 128));
        assert_eq!(k("v8", 64, 16, false), ("v3", 64, 128));
        assert_eq!(k("v8", 64, 24, true), ("v2", 32, 128));
        // Two v8 blocks fit an H100 SM's 228 KB: 128 Q rows, 2 stages of
        // 64-key K and V tiles, flags, 1 KB of alignment room each.
        let v8 = kernel_for("v8", 64, 16, true).unwrap();
        assert_eq!(
            v8.shared_bytes(64),
            2 * (128 * 64 + 2 * 2 * 64 * 64) + 4 * 2 * 64 + 1024
        );
        assert!(2 * (v8.shared_bytes(64) + 1024) <= 228 * 1024);
        // Every choice fits an A100 block's shared memory (v5 an H100's).
        for v in VARIANTS {
            for &(d, _) in HEAD_DIMS {
                for hopper in [false, true] {
                    let kernel = kernel_for(v, d, 16, hopper).unwrap();
                    let limit = if hopper { 227 } else { 163 } * 1024;
                    assert!(kernel.shared_bytes(d) <= limit, "{v} d{d}");
                }
            }
        }
        // v5 d128: Q 128 x 128 + 4 tiles of 128 x 128 bf16, unpadded, plus 2 x 128
        // flags and 1 KB of alignment room; v6 three stages, within an H100's 227 KB.
        let v5 = kernel_for("v5", 128, 16, true).unwrap();
        assert_eq!(
            v5.shared_bytes(128),
            2 * (128 * 128 + 4 * 128 * 128) + 1024 + 1024
        );
        let v6 = kernel_for("v6", 128, 16, true).unwrap();
        assert_eq!(
            v6.shared_bytes(128),
            2 * (128 * 128 + 6 * 128 * 128) + 1536 + 1024
        );
        assert!(v6.shared_bytes(128) <= 227 * 1024);
    }

    fn dims() -> PrefillAttentionDims {
        PrefillAttentionDims {
            batch: 2,
            total_q: 100,
            max_q_len: 60,
            q_heads: 14,
            kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            num_blocks: 30,
            max_blocks_per_seq: 8,
            scale: 0.125,
        }
    }

    #[test]
    fn bad_dims_are_refused_with_the_argument_named() {
        assert!(dims().validate().is_ok());
        let msg = |d: PrefillAttentionDims| d.validate().unwrap_err().to_string();
        assert!(msg(PrefillAttentionDims {
            head_dim: 72,
            ..dims()
        })
        .contains("head_dim 72"));
        assert!(msg(PrefillAttentionDims {
            q_heads: 13,
            ..dims()
        })
        .contains("not a multiple"));
        assert!(msg(PrefillAttentionDims {
            scale: f32::NAN,
            ..dims()
        })
        .contains("scale"));
        assert!(msg(PrefillAttentionDims {
            max_q_len: 101,
            ..dims()
        })
        .contains("max_q_len"));
        assert!(msg(PrefillAttentionDims {
            batch: 70000,
            ..dims()
        })
        .contains("batch"));
    }
}
