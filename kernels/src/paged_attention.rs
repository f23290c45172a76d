//! Launcher for `cuda/paged_attention.cu`: decode attention over the paged
//! KV cache (one query token per sequence).

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{cfg, grid_u32, typed_function, Launch};
use crate::rope::RopeTable;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig};

const OP: &str = "paged_attention";

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2", "v3", "v5", "v7", "v8", "v9"];
pub const PRODUCTION: &str = "v9";

/// v2's launch constants (paged_attention.cu).
const V2_THREADS: u32 = 128;
const V2_TILE: usize = 64;
const V2_MAX_GROUP: usize = 16;

/// Split-KV plan: (splits, tokens per split), enough blocks for two waves.
pub fn v2_splits(batch: usize, kv_heads: usize, max_ctx: usize, sm_count: usize) -> (usize, usize) {
    let ctas = (batch * kv_heads).max(1);
    let tiles = max_ctx.div_ceil(V2_TILE).max(1);
    let want = (2 * sm_count).div_ceil(ctas).clamp(1, tiles);
    let split_tokens = tiles.div_ceil(want) * V2_TILE;
    (max_ctx.div_ceil(split_tokens).max(1), split_tokens)
}

/// v3's launch constants (paged_attention.cu: PA3_WARPS, PA3_TILE, Pa3Cfg).
const V3_THREADS: u32 = 128;
const V3_TILE: usize = 64;
const V3_MAX_GROUP: usize = 16;
/// Head dims with a compiled v3 entry point (`paged_attention_v3_d{D}_*`).
const V3_HEAD_DIMS: &[usize] = &[32, 64, 80, 96, 128, 256];
/// Most splits `paged_attention_merge2` (v7's merge) takes (PA_MERGE2_MAX:
/// its shared-memory arrays); more go to `paged_attention_merge`.
const MERGE2_MAX: usize = 1024;

/// v3's dynamic shared memory: per warp a ring of `stages` chunks of 16
/// tokens, K and V rows of head_dim + 8 16-bit elements (Pa3Cfg::SMEM_BYTES).
fn v3_smem_bytes(head_dim: usize) -> usize {
    ring_smem_bytes(head_dim, v3_stages(head_dim))
}

/// v3's (and v5's, v8's) ring stages per warp (Pa3Cfg::STAGES).
fn v3_stages(head_dim: usize) -> usize {
    if head_dim <= 128 {
        3
    } else {
        2
    }
}

/// v9's deep-ring kernel's dynamic shared memory.
fn v9_smem_bytes(head_dim: usize) -> usize {
    ring_smem_bytes(head_dim, v9_stages(head_dim))
}

/// v9's deep-ring kernel's stages per warp (Pa3Cfg::DEEP).
fn v9_stages(head_dim: usize) -> usize {
    match head_dim {
        0..=96 => 8,
        97..=128 => 6,
        _ => 3,
    }
}

/// Bytes of a v3-family ring: 4 warps x `stages` x (K and V) x 16 tokens x
/// (head_dim + 8) 16-bit elements.
fn ring_smem_bytes(head_dim: usize, stages: usize) -> usize {
    (V3_THREADS as usize / 32) * stages * 2 * 16 * (head_dim + 8) * 2
}

/// v3's split-KV plan: (splits, tokens per split). The blocks of all splits
/// should fit on the card at once (`sm_count * blocks_per_sm`, from the
/// occupancy API), since a partial second wave would leave most SMs idle
/// while a few finish, and a memory-bound block needs no second wave to hide
/// latency (its own cp.async ring does). So: as many splits as fit in one
/// resident wave, at least one, in whole 64-token tiles, never more splits
/// than tiles. Sequences that already fill the card are not split (each
/// split adds a partial write and a merge read of group x head_dim floats).
pub fn v3_splits(
    batch: usize,
    kv_heads: usize,
    max_ctx: usize,
    sm_count: usize,
    blocks_per_sm: usize,
) -> (usize, usize) {
    let ctas = (batch * kv_heads).max(1);
    let slots = sm_count.max(1) * blocks_per_sm.max(1);
    let tiles = max_ctx.div_ceil(V3_TILE).max(1);
    let want = (slots / ctas).clamp(1, tiles);
    let split_tokens = tiles.div_ceil(want) * V3_TILE;
    (max_ctx.div_ceil(split_tokens).max(1), split_tokens)
}

/// v9's split-KV plan: (splits, tokens per split). The fewest splits whose
/// blocks cover nine in ten SMs, in whole 64-token tiles, never more splits
/// than tiles. Where v3's plan fills a resident wave (8 blocks per SM at
/// head_dim 64), this one leaves about one block per SM, each with a deep
/// ring (v9's kernel), so a sequence is split only when the card would
/// otherwise sit idle: no merge at all from batch x kv_heads >= 119 on an
/// H100, and long splits whose start and end latencies are paid once.
pub fn v9_splits(batch: usize, kv_heads: usize, max_ctx: usize, sm_count: usize) -> (usize, usize) {
    let ctas = (batch * kv_heads).max(1);
    let tiles = max_ctx.div_ceil(V3_TILE).max(1);
    let fill = (sm_count.max(1) * 9).div_ceil(10);
    let want = fill.div_ceil(ctas).clamp(1, tiles);
    let split_tokens = tiles.div_ceil(want) * V3_TILE;
    (max_ctx.div_ceil(split_tokens).max(1), split_tokens)
}

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
    /// Most tokens one split may cover (v2, v3), 0 for no cap. The split
    /// plan only sees the table width, not each sequence's length; a caller
    /// that knows its batch is ragged (the engine: contexts of 100 to 4096
    /// under a table as wide as the longest allowed) caps the split so long
    /// sequences spread over several blocks instead of finishing last.
    pub max_split_tokens: usize,
}

/// Apply a [`PagedAttentionDims::max_split_tokens`] cap to a split plan
/// (splits, tokens per split): whole tiles, never below one tile.
fn cap_splits(plan: (usize, usize), max_ctx: usize, cap: usize, tile: usize) -> (usize, usize) {
    if cap == 0 || plan.1 <= cap {
        return plan;
    }
    let t = (cap / tile).max(1) * tile;
    (max_ctx.div_ceil(t).max(1), t)
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
    variant: &str,
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
    match variant {
        "v1" => {}
        "v2" => return launch_v2(gpu, out, q, k_cache, v_cache, block_tables, context_lens, d),
        other => {
            let Some(v) = v3_family::<T>(other, &d) else {
                return Err(KernelError::Unsupported {
                    op: OP,
                    what: format!("variant `{other}` (known: {})", VARIANTS.join(", ")),
                });
            };
            let (o, tb, cl) = (out, block_tables, context_lens);
            return launch_v3(gpu, o, q, k_cache, v_cache, tb, cl, d, v);
        }
    }
    let f = typed_function::<T>(gpu, "paged_attention", "paged_attention_v1")?;
    let scale = d.scale;
    // SAFETY: every buffer length is checked above. Context lengths live on the
    // device: the kernel treats one outside [0, max_blocks_per_seq * block_size]
    // as bad (NaN output, nothing read) and range-checks every block id.
    unsafe {
        Launch::new(gpu, &f)
            .arg(&*out)
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

/// v2: split-KV, one block per (kv head, sequence, split), then a merge of
/// the splits when there are several. Shapes were checked by the caller.
#[allow(clippy::too_many_arguments)]
fn launch_v2<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
    block_tables: &CudaView<i32>,
    context_lens: &CudaView<i32>,
    d: PagedAttentionDims,
) -> Result<()> {
    let vec = 16 / std::mem::size_of::<T>();
    let group = d.q_heads / d.kv_heads;
    if d.head_dim % vec != 0 || group > V2_MAX_GROUP {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!(
                "v2 with head_dim {} (needs a multiple of {vec}) and group {group} (at most {V2_MAX_GROUP})",
                d.head_dim
            ),
        });
    }
    let max_ctx = d.max_blocks_per_seq * d.block_size;
    let (splits, split_tokens) = cap_splits(
        v2_splits(
            d.batch,
            d.kv_heads,
            max_ctx,
            gpu.info().sm_count.max(1) as usize,
        ),
        max_ctx,
        d.max_split_tokens,
        V2_TILE,
    );
    let smem = (4 * (group * (d.head_dim + 4) + group * V2_TILE + 3 * group) + 4 * V2_TILE) as u32;
    let f = typed_function::<T>(gpu, "paged_attention", "paged_attention_v2")?;
    // SAFETY (for launch_split): dynamic shared memory is sized for this
    // group and head_dim (at most ~21 KB); the kernel takes head_dim.
    let launch = SplitLaunch {
        symbol: "paged_attention_v2".into(),
        threads: V2_THREADS,
        smem,
        head_dim_arg: true,
        merge2: false,
        splits,
        split_tokens,
    };
    let inputs = Inputs::Plain {
        q,
        k_cache,
        v_cache,
    };
    launch_split(gpu, &f, launch, out, inputs, block_tables, context_lens, d)
}

/// How [`launch_split`] launches one of the split-KV kernels.
struct SplitLaunch {
    symbol: String,
    threads: u32,
    smem: u32,
    /// v2 takes head_dim as an argument; v3 has it compiled in.
    head_dim_arg: bool,
    /// v7, v8, v9: merge the splits with `paged_attention_merge2` (parallel loads).
    merge2: bool,
    splits: usize,
    split_tokens: usize,
}

/// What the split kernel reads: q and read-only caches (v2, v3), or v3f's
/// projection row, writable caches and the fused prologue's inputs.
enum Inputs<'a, 'b, T> {
    Plain {
        q: &'a CudaView<'b, T>,
        k_cache: &'a CudaView<'b, T>,
        v_cache: &'a CudaView<'b, T>,
    },
    Fused {
        a: FusedQkv<'a, 'b, T>,
        rope: &'a RopeTable,
    },
}

/// v2's and v3's common launch: partials in the device scratch, the
/// (kv head, sequence, split) grid, then the merge when there are splits.
#[allow(clippy::too_many_arguments)]
fn launch_split<T: Storage>(
    gpu: &Gpu,
    f: &cudarc::driver::CudaFunction,
    l: SplitLaunch,
    out: &mut CudaViewMut<T>,
    inputs: Inputs<'_, '_, T>,
    block_tables: &CudaView<i32>,
    context_lens: &CudaView<i32>,
    d: PagedAttentionDims,
) -> Result<()> {
    let splits = l.splits;
    let part_o = d.batch * d.q_heads * splits * d.head_dim;
    let part_ml = d.batch * d.q_heads * splits * 2;
    let mut scratch = gpu.scratch(4 * (part_o + part_ml))?;
    let buf = scratch.as_mut().ok_or_else(|| KernelError::Unsupported {
        op: OP,
        what: "scratch buffer missing".into(),
    })?;
    // SAFETY: the scratch holds at least 4 * (part_o + part_ml) bytes (sized above).
    let mut ws = unsafe { buf.transmute_mut::<f32>(part_o + part_ml) }.ok_or_else(|| {
        KernelError::Unsupported {
            op: OP,
            what: "scratch too small".into(),
        }
    })?;
    let (mut po, mut pml) = ws.split_at_mut(part_o);
    let (scale, q_heads, kv_heads, head_dim) = (
        d.scale,
        d.q_heads as i32,
        d.kv_heads as i32,
        d.head_dim as i32,
    );
    let (block_size, mbps, num_blocks, st) = (
        d.block_size as i32,
        d.max_blocks_per_seq as i32,
        d.num_blocks as i32,
        l.split_tokens as i32,
    );
    let grid = (
        d.kv_heads as u32,
        grid_u32(OP, "batch", d.batch)?,
        splits as u32,
    );
    let mut b = Launch::new(gpu, f);
    b.arg(&*out).arg(&po).arg(&pml);
    let (max_pos, num_slots) = match &inputs {
        Inputs::Fused { rope, .. } => (
            rope.max_positions as i32,
            (d.num_blocks * d.block_size) as i64,
        ),
        Inputs::Plain { .. } => (0, 0),
    };
    let fused = match inputs {
        Inputs::Plain {
            q,
            k_cache,
            v_cache,
        } => {
            b.arg(q).arg(k_cache).arg(v_cache);
            None
        }
        Inputs::Fused { a, rope } => {
            b.arg(a.qkv).arg(&*a.k_cache).arg(&*a.v_cache);
            Some((a.bias, a.positions, a.slot_mapping, rope))
        }
    };
    b.arg(block_tables)
        .arg(context_lens)
        .arg(&scale)
        .arg(&q_heads)
        .arg(&kv_heads);
    if l.head_dim_arg {
        b.arg(&head_dim);
    }
    b.arg(&block_size).arg(&mbps).arg(&num_blocks).arg(&st);
    if let Some((bias, positions, slot_mapping, rope)) = fused {
        b.arg(bias)
            .arg(positions)
            .arg(&rope.data)
            .arg(slot_mapping)
            .arg(&max_pos)
            .arg(&num_slots);
    }
    // SAFETY: lengths were checked by `paged_attention` (or
    // `paged_attention_fused_qkv`); the workspace views hold
    // batch*q_heads*splits*(head_dim + 2) floats; context lengths and block
    // ids are range-checked on the device as in v1, and v3f's positions and
    // slots too; the argument list is the kernel's (head_dim only where it
    // takes it, v3f's inputs after split_tokens); the caller checked the
    // kernel's own conditions (alignment, group, shared memory: see the
    // SAFETY notes at v2's and v3's calls).
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: grid,
            block_dim: (l.threads, 1, 1),
            shared_mem_bytes: l.smem,
        })
    }
    .map_err(KernelError::driver(format!("launch {}", l.symbol)))?;
    if splits > 1 {
        launch_merge(gpu, out, &mut po, &mut pml, d, splits, l.merge2)?;
    }
    Ok(())
}

/// Combine the splits' partials (v2's and v3's layout): out [batch, q_heads,
/// head_dim] from part_o [batch, q_heads, splits, head_dim] and part_ml
/// [batch, q_heads, splits, 2] (max in natural-log units, sum).
fn launch_merge<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    po: &mut CudaViewMut<f32>,
    pml: &mut CudaViewMut<f32>,
    d: PagedAttentionDims,
    splits: usize,
    merge2: bool,
) -> Result<()> {
    let name = match merge2 && splits <= MERGE2_MAX {
        true => "paged_attention_merge2",
        false => "paged_attention_merge",
    };
    let m = typed_function::<T>(gpu, "paged_attention", name)?;
    let (q_heads, head_dim, splits_i) = (d.q_heads as i32, d.head_dim as i32, splits as i32);
    // SAFETY: reads the partials written by the split kernel (the caller
    // sized them batch*q_heads*splits*(head_dim + 2) floats), writes out
    // (length checked by `paged_attention`).
    unsafe {
        Launch::new(gpu, &m)
            .arg(&*out)
            .arg(&*po)
            .arg(&*pml)
            .arg(&q_heads)
            .arg(&head_dim)
            .arg(&splits_i)
            .launch(cfg(
                (d.q_heads as u32, grid_u32(OP, "batch", d.batch)?, 1),
                128,
            ))
    }
    .map_err(KernelError::driver(format!("launch {name}")))?;
    Ok(())
}

/// True when every pointer is 16-byte aligned. v3 copies cache rows with
/// 16-byte cp.async (which needs it), loads q in 4-byte pairs and stores out
/// in 8-byte quads; one rule for all four keeps the check simple.
fn v3_aligned<T: Storage>(
    gpu: &Gpu,
    out: &CudaViewMut<T>,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
) -> bool {
    let s = gpu.stream();
    let ptrs = [
        out.device_ptr(s).0,
        q.device_ptr(s).0,
        k_cache.device_ptr(s).0,
        v_cache.device_ptr(s).0,
    ];
    ptrs.iter().all(|p| p % 16 == 0)
}

/// v3: v2's grid and merge with tensor cores and a per-warp cp.async ring
/// (see paged_attention.cu). f32 storage goes to v2: the mma takes 16-bit
/// operands, which cannot keep f32's 1e-5 accuracy. Head dims without a v3
/// entry point go to v2 as well, and buffers that are not 16-byte aligned
/// (a view at an odd offset) to v1, the only variant without vector loads.
/// Shapes were checked by the caller. `version` "v5" runs v5 (the caller
/// checked `v5_takes`) on the same path, "v7" v5's kernel with
/// `paged_attention_merge2`, and "v8" its padded-rows kernel with it.
#[allow(clippy::too_many_arguments)]
fn launch_v3<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
    block_tables: &CudaView<i32>,
    context_lens: &CudaView<i32>,
    d: PagedAttentionDims,
    version: &str,
) -> Result<()> {
    let group = d.q_heads / d.kv_heads;
    if group > V3_MAX_GROUP {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("v3 with group {group} (at most {V3_MAX_GROUP})"),
        });
    }
    if T::DTYPE == crate::dtype::DType::F32 || !V3_HEAD_DIMS.contains(&d.head_dim) {
        return launch_v2(gpu, out, q, k_cache, v_cache, block_tables, context_lens, d);
    }
    if !v3_aligned(gpu, out, q, k_cache, v_cache) {
        return paged_attention(
            gpu,
            out,
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            d,
            "v1",
        );
    }
    let (f, launch) = v3_plan::<T>(gpu, version, "", d)?;
    let inputs = Inputs::Plain {
        q,
        k_cache,
        v_cache,
    };
    launch_split(gpu, &f, launch, out, inputs, block_tables, context_lens, d)
}

/// v3's (and v3f's, v5's, v5f's, ...) function, shared memory opt-in and
/// split plan for a v3-family `version` ("v3", "v5", "v7", "v8" or "v9";
/// `fused` "f" for the fused entry points, "" otherwise).
fn v3_plan<T: Storage>(
    gpu: &Gpu,
    version: &str,
    fused: &str,
    d: PagedAttentionDims,
) -> Result<(cudarc::driver::CudaFunction, SplitLaunch)> {
    let sm_count = gpu.info().sm_count.max(1) as usize;
    let max_ctx = d.max_blocks_per_seq * d.block_size;
    // (symbol, function, shared memory, blocks per SM) of one kernel.
    let ring = |kernel: &str, smem: usize| -> Result<_> {
        let symbol = format!("paged_attention_{kernel}{fused}_d{}", d.head_dim);
        let (f, per_sm) = ring_function::<T>(gpu, &symbol, smem)?;
        Ok((symbol, f, smem, per_sm))
    };
    let (symbol, f, smem, (splits, split_tokens)) = if version == "v9" {
        // The fewest splits; the deep ring where a warp has more chunks
        // than v8's ring holds in flight and every block stays resident
        // with it, v8's ring (more blocks per SM) elsewhere. Short splits
        // (batch 1: one chunk per warp) gain nothing from depth and timed
        // 0.26 us slower with it on the H100 (5.89 against 5.63 us at 1 x
        // 1024).
        let plan = cap_splits(
            v9_splits(d.batch, d.kv_heads, max_ctx, sm_count),
            max_ctx,
            d.max_split_tokens,
            V3_TILE,
        );
        let v8_in_flight = (v3_stages(d.head_dim) - 1) * V3_TILE;
        let deep = match plan.1 > v8_in_flight {
            true => Some(ring("v9", v9_smem_bytes(d.head_dim))?),
            false => None,
        };
        let blocks = d.batch * d.kv_heads * plan.0;
        let (symbol, f, smem, _) = match deep {
            Some(k) if blocks <= sm_count * k.3 => k,
            _ => ring("v8", v3_smem_bytes(d.head_dim))?,
        };
        (symbol, f, smem, plan)
    } else {
        let (symbol, f, smem, per_sm) = ring(kernel_of(version), v3_smem_bytes(d.head_dim))?;
        let plan = v3_splits(d.batch, d.kv_heads, max_ctx, sm_count, per_sm);
        (
            symbol,
            f,
            smem,
            cap_splits(plan, max_ctx, d.max_split_tokens, V3_TILE),
        )
    };
    // SAFETY (for launch_split): the callers checked that q (or qkv), out
    // and both caches are 16-byte aligned and head_dim a multiple of 16, so
    // every cp.async row piece, q pair and out quad is aligned; the group is
    // at most 16 (the mma's rows); the dynamic shared memory is the kernel's
    // ring size for this head_dim, opted into by ring_function.
    let launch = SplitLaunch {
        symbol,
        threads: V3_THREADS,
        smem: smem as u32,
        head_dim_arg: false,
        merge2: uses_merge2(version),
        splits,
        split_tokens,
    };
    Ok((f, launch))
}

/// A v3-family kernel with its `smem` bytes of dynamic shared memory opted
/// into, and how many of its blocks fit on one SM (the occupancy API).
fn ring_function<T: Storage>(
    gpu: &Gpu,
    symbol: &str,
    smem: usize,
) -> Result<(cudarc::driver::CudaFunction, usize)> {
    let f = typed_function::<T>(gpu, "paged_attention", symbol)?;
    // More than the default 48 KiB of dynamic shared memory must be opted into.
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(KernelError::driver(format!("cuFuncSetAttribute({symbol})")))?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(V3_THREADS, smem, None)
        .map_err(KernelError::driver(format!(
            "cuOccupancyMaxActiveBlocksPerMultiprocessor({symbol})"
        )))?;
    if per_sm == 0 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!(
                "{symbol}: {smem} bytes of shared memory per block do not fit this device"
            ),
        });
    }
    Ok((f, per_sm as usize))
}

/// v3f's inputs: the engine's fused projection before bias and RoPE, and the
/// caches it writes the new token into.
pub struct FusedQkv<'a, 'b, T> {
    /// [batch, (q_heads + 2 kv_heads) * head_dim]: q | k | v of the new token.
    pub qkv: &'a CudaView<'b, T>,
    /// [(q_heads + 2 kv_heads) * head_dim].
    pub bias: &'a CudaView<'b, T>,
    /// [num_blocks, block_size, kv_heads, head_dim] each.
    pub k_cache: &'a mut CudaViewMut<'b, T>,
    pub v_cache: &'a mut CudaViewMut<'b, T>,
    /// [batch] i32: the new token's position (its RoPE row).
    pub positions: &'a CudaView<'b, i32>,
    /// [batch] i64: the new token's cache slot; negative = not stored.
    pub slot_mapping: &'a CudaView<'b, i64>,
}

/// True when v5 runs this case itself: v3's conditions (16-bit storage, a
/// compiled head_dim, group <= 16) plus a power-of-two block_size >= 16 (a
/// 16-token chunk in one block) and a positive scale (the running max is
/// taken before scaling). Anything else runs v3, which has its own fallbacks.
fn v5_takes<T: Storage>(d: &PagedAttentionDims) -> bool {
    T::DTYPE != crate::dtype::DType::F32
        && V3_HEAD_DIMS.contains(&d.head_dim)
        && d.q_heads / d.kv_heads.max(1) <= V3_MAX_GROUP
        && d.block_size.is_power_of_two()
        && d.block_size >= 16
        && d.scale > 0.0
}

/// The variants on v3's path (its grid, ring and merge): v3, and v5's kernel
/// and its descendants.
const V3_FAMILY: &[&str] = &["v3", "v5", "v7", "v8", "v9"];

/// The v3-family variant that runs `variant` on this case: the variant
/// itself where v5's kernel takes the case, v3 (with its own fallbacks)
/// elsewhere; None for a variant outside [`V3_FAMILY`].
fn v3_family<T: Storage>(variant: &str, d: &PagedAttentionDims) -> Option<&'static str> {
    let v = *V3_FAMILY.iter().find(|v| **v == variant)?;
    Some(if v5_takes::<T>(d) { v } else { "v3" })
}

/// The split kernel of a v3-family variant: v7 is v5's kernel with
/// `paged_attention_merge2`; v8 has its own (v5's, rows padded) with it.
fn kernel_of(variant: &str) -> &str {
    match variant {
        "v7" => "v5",
        v => v,
    }
}

/// Whether a v3-family variant merges with `paged_attention_merge2`.
fn uses_merge2(variant: &str) -> bool {
    matches!(variant, "v7" | "v8" | "v9")
}

/// True when [`paged_attention_fused_qkv`] takes this storage type and
/// head_dim (v3's: bf16 or f16, a compiled head_dim).
pub fn fused_qkv_supported(dtype: crate::dtype::DType, head_dim: usize) -> bool {
    dtype != crate::dtype::DType::F32 && V3_HEAD_DIMS.contains(&head_dim)
}

/// Decode attention straight from the fused projection (v3f, the engine's
/// decode path): the same result, bit for bit, as
/// `rope_kv_store::qkv_rope_kv_store` (bias, RoPE, store of the new token)
/// followed by `paged_attention` v3, in one launch instead of two (the
/// rotated q is never written out). context_lens[b] counts the new token,
/// whose slot must be the one the block table gives for token
/// context_lens[b] - 1 of sequence b. `variant` "v5" runs v5f where v5
/// takes the case (v3f otherwise); "v3" runs v3f.
///
/// With `Gpu::pdl()` on, v5f reads the context lengths, block tables, slot
/// mapping and the cache's older rows before it waits for the previous
/// kernel of the stream, so that kernel must not write them (in the engine
/// it is the q|k|v GEMM, which writes only `qkv`).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_fused_qkv<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    a: FusedQkv<'_, '_, T>,
    block_tables: &CudaView<i32>,
    context_lens: &CudaView<i32>,
    rope: &RopeTable,
    d: PagedAttentionDims,
    variant: &str,
) -> Result<()> {
    const F: &str = "paged_attention v3f";
    d.validate()?;
    if !fused_qkv_supported(T::DTYPE, d.head_dim) {
        return Err(KernelError::Unsupported {
            op: F,
            what: format!(
                "{:?} storage with head_dim {} (v3f: bf16 or f16, head_dim one of {V3_HEAD_DIMS:?})",
                T::DTYPE,
                d.head_dim
            ),
        });
    }
    let group = d.q_heads / d.kv_heads;
    if group > V3_MAX_GROUP {
        return Err(KernelError::Unsupported {
            op: F,
            what: format!("group {group} (at most {V3_MAX_GROUP})"),
        });
    }
    if rope.head_dim != d.head_dim {
        return Err(KernelError::shape(
            F,
            "rope table head_dim",
            d.head_dim,
            rope.head_dim,
        ));
    }
    for (what, v) in [
        ("q_heads", d.q_heads),
        ("kv_heads", d.kv_heads),
        ("block_size", d.block_size),
        ("num_blocks", d.num_blocks),
        ("max_blocks_per_seq", d.max_blocks_per_seq),
    ] {
        dim_i32(F, what, v)?;
    }
    let row = (d.q_heads + 2 * d.kv_heads) * d.head_dim;
    check_len(
        F,
        "qkv [batch, (q_heads + 2 kv_heads) * head_dim]",
        a.qkv.len(),
        d.batch * row,
    )?;
    check_len(
        F,
        "bias [(q_heads + 2 kv_heads) * head_dim]",
        a.bias.len(),
        row,
    )?;
    check_len(
        F,
        "out [batch, q_heads, head_dim]",
        out.len(),
        d.batch * d.q_heads * d.head_dim,
    )?;
    let cache = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
    check_len(
        F,
        "k_cache [num_blocks, block_size, kv_heads, head_dim]",
        a.k_cache.len(),
        cache,
    )?;
    check_len(
        F,
        "v_cache [num_blocks, block_size, kv_heads, head_dim]",
        a.v_cache.len(),
        cache,
    )?;
    check_len(
        F,
        "block_tables [batch, max_blocks_per_seq]",
        block_tables.len(),
        d.batch * d.max_blocks_per_seq,
    )?;
    check_len(F, "context_lens [batch]", context_lens.len(), d.batch)?;
    check_len(F, "positions [batch]", a.positions.len(), d.batch)?;
    check_len(F, "slot_mapping [batch]", a.slot_mapping.len(), d.batch)?;
    if d.batch == 0 {
        return Ok(());
    }
    let s = gpu.stream();
    let aligned = [
        out.device_ptr(s).0,
        a.qkv.device_ptr(s).0,
        a.bias.device_ptr(s).0,
        a.k_cache.device_ptr(s).0,
        a.v_cache.device_ptr(s).0,
        rope.data.device_ptr(s).0,
    ]
    .iter()
    .all(|p| p % 16 == 0);
    if !aligned {
        return Err(KernelError::Unsupported {
            op: F,
            what: "a buffer that is not 16-byte aligned (a view at an odd offset)".into(),
        });
    }
    let v = v3_family::<T>(variant, &d).ok_or_else(|| KernelError::Unsupported {
        op: F,
        what: format!("variant `{variant}` (fused: {})", V3_FAMILY.join(", ")),
    })?;
    let (f, launch) = v3_plan::<T>(gpu, v, "f", d)?;
    let inputs = Inputs::Fused { a, rope };
    launch_split(gpu, &f, launch, out, inputs, block_tables, context_lens, d)
}

#[cfg(test)]
mod tests {
    use super::{v2_splits, v3_smem_bytes, v3_splits};

    #[test]
    fn v7_runs_v5s_kernel_where_v5_takes_the_case_and_v3_elsewhere() {
        use super::{kernel_of, v3_family, PagedAttentionDims};
        let d = PagedAttentionDims {
            batch: 4,
            q_heads: 14,
            kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            num_blocks: 64,
            max_blocks_per_seq: 16,
            scale: 0.125,
            max_split_tokens: 0,
        };
        type B = half::bf16;
        assert_eq!(v3_family::<B>("v7", &d), Some("v7"));
        assert_eq!(kernel_of("v7"), "v5");
        assert_eq!(v3_family::<B>("v5", &d), Some("v5"));
        assert_eq!(v3_family::<B>("v3", &d), Some("v3"));
        // Block size 24 (not a power of two), f32 storage, a negative scale:
        // v5's kernel refuses, so v7 and v5 run v3 (old merge).
        let odd = PagedAttentionDims {
            block_size: 24,
            ..d
        };
        assert_eq!(v3_family::<B>("v7", &odd), Some("v3"));
        assert_eq!(v3_family::<f32>("v7", &d), Some("v3"));
        let neg = PagedAttentionDims { scale: -0.125, ..d };
        assert_eq!(v3_family::<B>("v7", &neg), Some("v3"));
        assert_eq!(kernel_of("v3"), "v3");
        assert_eq!(v3_family::<B>("v8", &d), Some("v8"));
        assert_eq!(kernel_of("v8"), "v8");
        assert_eq!(v3_family::<B>("v8", &odd), Some("v3"));
        assert_eq!(v3_family::<B>("v9", &d), Some("v9"));
        assert_eq!(kernel_of("v9"), "v9");
        assert_eq!(v3_family::<B>("v9", &odd), Some("v3"));
        assert_eq!(v3_family::<f32>("v9", &d), Some("v3"));
        assert!(super::uses_merge2("v9") && !super::uses_merge2("v5"));
        // v1 and v2 have their own paths.
        assert_eq!(v3_family::<B>("v2", &d), None);
    }

    #[test]
    fn v9_splits_only_to_give_every_sm_a_block() {
        use super::v9_splits;
        // 64 x 2 = 128 blocks cover 119 of 132 SMs: no split, no merge.
        assert_eq!(v9_splits(64, 2, 1024, 132), (1, 1024));
        assert_eq!(v9_splits(256, 2, 1024, 132), (1, 1024));
        assert_eq!(v9_splits(64, 2, 4096, 132), (1, 4096));
        // 8 x 8 = 64 blocks: 2 splits of 16384 (v3's plan: 4 of 8192).
        assert_eq!(v9_splits(8, 8, 32768, 132), (2, 16384));
        // Small batches split as far as the tiles allow, like v3's plan.
        assert_eq!(v9_splits(1, 2, 1024, 132), (16, 64));
        assert_eq!(v9_splits(8, 2, 512, 132), (8, 64));
        assert_eq!(v9_splits(3, 2, 0, 132), (1, 64));
        for (b, kv, ctx) in [
            (8, 8, 32768),
            (3, 2, 85),
            (1, 1, 1),
            (100, 2, 777),
            (2, 2, 4097),
        ] {
            let (s, t) = v9_splits(b, kv, ctx, 132);
            assert!(
                s * t >= ctx && (s - 1) * t < ctx.max(1),
                "{b} {kv} {ctx}: {s} x {t}"
            );
            assert_eq!(t % 64, 0);
            // Never more blocks than needed to cover the SMs, unless a
            // split is already one tile.
            assert!(
                s == 1 || t == 64 || b * kv * (s - 1) < 119,
                "{b} {kv} {ctx}: {s}"
            );
        }
    }

    #[test]
    fn a_split_cap_spreads_long_contexts_over_whole_tiles() {
        use super::cap_splits;
        // No cap, or a cap above the plan: unchanged.
        assert_eq!(cap_splits((1, 4096), 4096, 0, 64), (1, 4096));
        assert_eq!(cap_splits((2, 2048), 4096, 4096, 64), (2, 2048));
        // 4096 tokens capped at 512: 8 splits of 512.
        assert_eq!(cap_splits((1, 4096), 4096, 512, 64), (8, 512));
        // A cap that is not a tile multiple rounds down, never below a tile.
        assert_eq!(cap_splits((1, 1000), 1000, 300, 64), (4, 256));
        assert_eq!(cap_splits((1, 1000), 1000, 10, 64), (16, 64));
    }

    #[test]
    fn split_plan_fills_the_card_and_covers_the_context() {
        // 256 x 4 = 1024 blocks already fill 132 SMs: no split.
        assert_eq!(v2_splits(256, 4, 2048, 132), (1, 2048));
        // One sequence, 2 kv heads, 1024 tokens: 16 tiles, 16 splits of 64.
        assert_eq!(v2_splits(1, 2, 1024, 132), (16, 64));
        for (b, kv, ctx) in [(8, 8, 32768), (3, 2, 85), (1, 1, 1), (64, 2, 4096)] {
            let (s, t) = v2_splits(b, kv, ctx, 132);
            assert!(
                s * t >= ctx && (s - 1) * t < ctx.max(1),
                "{b} {kv} {ctx}: {s} x {t}"
            );
            assert_eq!(t % 64, 0);
        }
    }

    #[test]
    fn v3_split_plan_is_one_resident_wave_of_whole_tiles() {
        // 256 x 8 = 2048 blocks already fill 132 SMs x 2: no split.
        assert_eq!(v3_splits(256, 8, 2048, 132, 2), (1, 2048));
        // 64 x 2 = 128 blocks, 264 slots: 2 splits of 2048 tokens.
        assert_eq!(v3_splits(64, 2, 4096, 132, 2), (2, 2048));
        // 8 x 8 = 64 blocks: 4 splits of 8192.
        assert_eq!(v3_splits(8, 8, 32768, 132, 2), (4, 8192));
        // One sequence, 2 kv heads, 1024 tokens: as many splits as tiles.
        assert_eq!(v3_splits(1, 2, 1024, 132, 4), (16, 64));
        // Nothing to attend to still launches one split.
        assert_eq!(v3_splits(3, 2, 0, 132, 2), (1, 64));
        for (b, kv, ctx, per_sm) in [
            (8, 8, 32768, 2),
            (3, 2, 85, 4),
            (1, 1, 1, 2),
            (64, 2, 4096, 2),
            (64, 2, 1024, 4),
            (100, 2, 777, 3),
            (2, 2, 4097, 2),
        ] {
            let (s, t) = v3_splits(b, kv, ctx, 132, per_sm);
            assert!(
                s * t >= ctx && (s - 1) * t < ctx.max(1),
                "{b} {kv} {ctx}: {s} x {t}"
            );
            assert_eq!(t % 64, 0);
            // One resident wave, unless a single split already overflows it.
            assert!(s == 1 || b * kv * s <= 132 * per_sm, "{b} {kv} {ctx}: {s}");
        }
    }

    #[test]
    fn v3_ring_matches_the_kernel_and_fits_an_h100() {
        // Pa3Cfg: 4 warps x stages x (K, V) x 16 rows x (D + 8) x 2 bytes.
        assert_eq!(v3_smem_bytes(64), 4 * 3 * 2 * 16 * 72 * 2);
        assert_eq!(v3_smem_bytes(128), 4 * 3 * 2 * 16 * 136 * 2);
        assert_eq!(v3_smem_bytes(256), 4 * 2 * 2 * 16 * 264 * 2);
        for d in super::V3_HEAD_DIMS {
            // The end-of-split merge reuses the ring for [4][16][D] f32.
            assert!(v3_smem_bytes(*d) >= 4 * 16 * d * 4);
            assert!(v3_smem_bytes(*d) <= 227 * 1024);
            // v9's deep ring (Pa3Cfg::DEEP) fits one block beside the
            // kernel's static shared memory (under 1 KiB).
            let deep = super::v9_smem_bytes(*d);
            assert!(
                deep > v3_smem_bytes(*d) && deep + 1024 <= 227 * 1024,
                "{d}: {deep}"
            );
        }
        assert_eq!(super::v9_smem_bytes(64), 4 * 8 * 2 * 16 * 72 * 2);
        assert_eq!(super::v9_smem_bytes(128), 4 * 6 * 2 * 16 * 136 * 2);
        assert_eq!(super::v9_smem_bytes(256), 4 * 3 * 2 * 16 * 264 * 2);
    }
}
