//! `prefill_attention`: causal attention of packed variable-length prefills
//! over the paged KV cache, after an optional cached prefix (plain prefill,
//! chunked prefill, prefix reuse), with GQA.
//!
//! Sequence 0 has `q_len` new tokens after `prefix` cached ones; with
//! `ragged=1` every other sequence draws its own q_len in 1..=q_len and prefix
//! in 0..=prefix. The new tokens' K/V sit in the cache with the prefix (the
//! kernel only reads it). As in `paged_attention`, block tables are random
//! permutations of a pool `pool` times larger than needed (default 3), unused
//! table entries hold stale but valid ids, and every cache slot without a live
//! token is NaN: reading past a context or a wrong block turns the output NaN.
//!
//! Case keys: batch, q_heads, kv_heads, head_dim, block_size, q_len, prefix,
//! ragged (0/1), pool, gen, seed. Softmax scale 1/sqrt(head_dim).
//!
//! The f64 reference (`reference::prefill_attention::prefill_paged`) costs
//! 7 to 25 ns per (query row, visible key, query head, head dim) on one core
//! (more for contexts whose K/V outgrow the caches), twice (the output and
//! its error scale). A 16384-token causal prefill with 32 heads of 128 is
//! ~5.5e11 such terms: far more than a device call's 10 minutes on 16 cores. So a case whose reference would exceed
//! [`REF_BUDGET`] is checked on a sample of rows: every `stride`-th group of
//! 16 consecutive rows of each sequence (stride odd, so the groups start at
//! every 16-row warp slice of the 64-row tiles and cover every row offset)
//! plus each sequence's last 16 rows (its longest contexts); the other rows
//! must still be written and finite. Every check case and every random case
//! fits the budget and is compared in full (a unit test below holds that);
//! only the perf cases are sampled.

use crate::case::{Case, CaseError};
use crate::compare::{Metrics, Tolerance};
use crate::gen::{self, Gen};
use crate::guard::Guarded;
use crate::op::{
    rand_buf, rounded_once, static_variant, to_f64, to_storage, upload, Bench, Op, RunError,
    Sabotage, Stored, Variant, Verify,
};
use crate::shapes::{flat, view3, view4};
use cudarc::driver::CudaSlice;
use kernels::prefill_attention::{PrefillAttentionDims, HEAD_DIMS};
use kernels::KernelError;
use kernels::{DType, Gpu};
use ndarray::ArrayView2;
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rayon::prelude::*;

pub struct PrefillAttention;

const VARIANTS: &[Variant] = &[Variant {
    name: "v1",
    note: "FlashAttention-2 on mma.sync m16n8k16: 64 query rows x 1 head per block, K/V tiles through the block table by cp.async (double-buffered), online softmax in registers, P reused as the A operand",
    production: false,
},
Variant {
    name: "v2",
    note: "v1 with 128 query rows a block (32 a warp) and 32-key tiles: each K and V fragment read from shared memory feeds two MMAs (a third less shared-memory traffic per MMA); head dims 64/96/128, others run v1; on the H100 (2026-11-26) 199-214 TFLOP/s at head dim 128, 1.32-1.35x v1",
    production: false,
},
Variant {
    name: "v3",
    note: "v2 (64-key tiles for head dim 64) with fewer instructions beside the MMAs: ex2.approx, O rescaled only when a row's max grows (warp vote), block and slot by shift and mask (power-of-two block sizes; others run v2), block-table entries loaded a tile ahead; on the H100 (2026-11-26) 237-277 TFLOP/s, 1.29-1.42x v2, 0.82-0.93x SDPA flash (FlashAttention-2)",
    production: false,
},
Variant {
    name: "v4",
    note: "v3's savings on v1's tiles (64 query rows, 16 a warp, 64-key tiles, Q in registers): half v3's barriers and votes per key at 0.5 instead of 0.375 shared-memory reads per MMA; power-of-two block sizes, others run v1; on the H100 (2026-11-26) 0.84-0.89x v3 at 4096-16384 tokens, 1.03x at 16 x 1024 (head dim 64)",
    production: false,
},
Variant {
    name: "v5",
    note: "v3's algorithm on Hopper's warpgroup MMA (wgmma, sm_90a): 2 warpgroups x 64 query rows a block, S = Q K^T with Q and K read by the tensor cores from shared memory (128-byte swizzle, FlashAttention-3's layout), O += P V with P from registers and V as the transposed operand; 128-key tiles; other GPUs, block sizes and head dims run v3's choice; on the H100 (2026-11-26 13:56) 303-342 TFLOP/s at head dim 128 (1.00-1.09x SDPA flash, 1.21-1.23x v3), 0.90x v3 at 64",
    production: false,
},
Variant {
    name: "v6",
    note: "v5 with FlashAttention-3's intra-warpgroup overlap: S = Q K^T of key tile j+1 is issued before O += P V of tile j, and the softmax of tile j+1 runs while the tensor cores do that P V; three K/V stages, one barrier a tile; 128-key tiles; head dim 128 only (its head-dim-64 kernel ran 0.90-0.94x v3: head dim 64 runs v3's kernel), same fallbacks as v5; on the H100 (2026-11-26 13:56) 307-341 TFLOP/s at head dim 128, 0.995-1.08x SDPA flash (FlashAttention-2), 1.21-1.23x v3",
    production: false,
},
Variant {
    name: "v7",
    note: "v5's tiles (128-key tiles, head dims 64 and 128) with the two warpgroups in ping-pong without a producer warp: warpgroup 1 runs half a tile behind (after the barrier of tile j it does the softmax and P V of tile j-1, then S of tile j), so one warpgroup's exponentials run beside the other's MMAs; three K/V stages, one barrier a tile; same fallbacks as v5; on the H100 (2026-11-26 14:24) 326-369 TFLOP/s at head dim 128, 1.08-1.17x SDPA flash (FlashAttention-2), 1.07-1.09x v6, 1.29-1.33x v3; at head dim 64 1.02x v3 at 4 x 4096 (0.93x FA2), 0.97x at 16 x 1024",
    production: false,
},
Variant {
    name: "v8",
    note: "v5's schedule at head dim 64 on 64-key tiles, registers capped at 128 a thread so two blocks (4 warpgroups, 16 warps) share an SM where v7's 254-register kernel fits one; two K/V stages (50 KB a block); head dim 128 runs v7's kernel, same fallbacks as v5; on the H100 (2026-11-26 20:55, A/B) 279 TFLOP/s at 4 x 4096 and 215 at 16 x 1024, 1.16-1.26x v7",
    production: true,
}];

/// bf16 and f16 only: the kernel runs on tensor cores (f32 storage is
/// refused by the launcher).
const DTYPES: &[DType] = &[DType::BF16, DType::F16];

/// `large`: q and k near ±4 (scores in the tens: a sharply peaked softmax),
/// v near ±1e4.
const LARGE_QK: f64 = 4.0;
const LARGE_V: f64 = 1.0e4;

/// Reference work (query rows x visible keys x q_heads x head_dim) above
/// which the check samples rows: ~1.1e9 terms. Measured on 2 threads:
/// 25-30 s for a sampled 4096- or 16384-token perf case (a few seconds on
/// the GPU host's 16 cores).
pub const REF_BUDGET: u64 = 1 << 30;

/// Most rows per reference work item (one gather of the context each);
/// fewer when that leaves under [`REF_ITEMS`] items for the threads.
const REF_CHUNK_ROWS: usize = 32;
const REF_ITEMS: usize = 64;

/// Consecutive rows per sampled group (one warp's slice of a query tile).
const SAMPLE_ROWS: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Params {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    q_len: usize,
    prefix: usize,
    ragged: bool,
    pool: usize,
}

impl Params {
    /// Table entries per sequence: enough for the longest context.
    fn max_blocks_per_seq(&self) -> usize {
        (self.prefix + self.q_len).div_ceil(self.block_size).max(1)
    }
    fn num_blocks(&self) -> usize {
        self.batch * self.max_blocks_per_seq() * self.pool
    }
}

fn params(case: &Case) -> Result<Params, CaseError> {
    let p = Params {
        batch: case.dim("batch")?,
        q_heads: case.dim("q_heads")?,
        kv_heads: case.dim("kv_heads")?,
        head_dim: case.dim("head_dim")?,
        block_size: case.dim("block_size")?,
        q_len: case.dim("q_len")?,
        prefix: case.parse_or("prefix", 0usize, "a cached prefix length >= 0")?,
        ragged: case.flag("ragged")?,
        pool: case.parse_or("pool", 3usize, "a positive integer")?.max(1),
    };
    let bad = |key: &str, value: usize, want: String| CaseError::Value {
        case: case.to_string(),
        key: key.into(),
        value: value.to_string(),
        want,
    };
    if p.q_heads % p.kv_heads != 0 {
        return Err(bad("q_heads", p.q_heads, "a multiple of kv_heads".into()));
    }
    if !HEAD_DIMS.iter().any(|(d, _)| *d == p.head_dim) {
        let dims: Vec<String> = HEAD_DIMS.iter().map(|(d, _)| d.to_string()).collect();
        return Err(bad(
            "head_dim",
            p.head_dim,
            format!("one of {}", dims.join(", ")),
        ));
    }
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn case(
    batch: usize,
    q: usize,
    kv: usize,
    d: usize,
    bs: usize,
    q_len: usize,
    prefix: usize,
    ragged: u8,
    gen: Gen,
) -> Case {
    Case::new()
        .with("batch", batch)
        .with("q_heads", q)
        .with("kv_heads", kv)
        .with("head_dim", d)
        .with("block_size", bs)
        .with("q_len", q_len)
        .with("prefix", prefix)
        .with("ragged", ragged)
        .with("gen", gen)
        .with("seed", 5)
}

/// Causal (query, key) pairs of one sequence: query i sees prefix + i + 1 keys.
fn causal_pairs(q_len: usize, prefix: usize) -> u64 {
    let (q, p) = (q_len as u64, prefix as u64);
    q * p + q * (q + 1) / 2
}

/// The rows the reference computes, as (sequence, first row, end row) runs
/// in row order, and the sampling stride in groups of [`SAMPLE_ROWS`] rows
/// (1: every row). `q_lens` and `prefixes` are per sequence.
fn ref_plan(
    q_lens: &[usize],
    prefixes: &[usize],
    q_heads: usize,
    head_dim: usize,
    budget: u64,
) -> (Vec<(usize, usize, usize)>, usize) {
    let per_key = (q_heads * head_dim) as u64;
    let work: u64 = q_lens
        .iter()
        .zip(prefixes)
        .map(|(&q, &p)| causal_pairs(q, p) * per_key)
        .sum();
    // Odd, so that the sampled groups start at every multiple of 16 mod 64.
    let stride = if work <= budget {
        1
    } else {
        (work.div_ceil(budget) as usize) | 1
    };
    let keep = |i: usize, q: usize| (i / SAMPLE_ROWS) % stride == 0 || i + SAMPLE_ROWS >= q;
    let kept: usize = q_lens
        .iter()
        .map(|&q| (0..q).filter(|&i| keep(i, q)).count())
        .sum();
    let chunk = (kept / REF_ITEMS).clamp(1, REF_CHUNK_ROWS);
    let mut runs = Vec::new();
    for (b, &q) in q_lens.iter().enumerate() {
        let keep = |i: usize| keep(i, q);
        let mut i = 0;
        while i < q {
            if !keep(i) {
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < q && end - i < chunk && keep(end) {
                end += 1;
            }
            runs.push((b, i, end));
            i = end;
        }
    }
    (runs, stride)
}

impl Op for PrefillAttention {
    fn name(&self) -> &'static str {
        "prefill_attention"
    }
    fn about(&self) -> &'static str {
        "causal prefill attention of packed variable-length sequences over a paged KV cache with a cached prefix (GQA, tensor cores)"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn dtypes(&self) -> &'static [DType] {
        DTYPES
    }
    fn keys(&self) -> &'static [&'static str] {
        &[
            "batch",
            "q_heads",
            "kv_heads",
            "head_dim",
            "block_size",
            "q_len",
            "prefix",
            "ragged",
            "pool",
        ]
    }
    fn sabotages(&self) -> &'static [Sabotage] {
        Sabotage::PAGED
    }
    fn validate(&self, case: &Case) -> Result<(), CaseError> {
        params(case).map(|_| ())
    }

    fn check_cases(&self) -> Vec<Case> {
        let mut v = Vec::new();
        // One new token, alone and after a prefix (a decode step as a prefill).
        v.push(case(1, 14, 2, 64, 16, 1, 0, 0, Gen::Randn));
        v.push(case(1, 14, 2, 64, 16, 1, 100, 0, Gen::Randn));
        // Prompt lengths around the cache block sizes.
        for bs in [8, 16, 32] {
            for n in [bs - 1, bs, bs + 1] {
                v.push(case(2, 14, 2, 64, bs, n, 0, 0, Gen::Randn));
            }
        }
        // Around the 64-row query tile and the 64-key tile.
        for n in [63, 64, 65, 127, 128, 129] {
            v.push(case(2, 12, 2, 128, 16, n, 0, 0, Gen::Randn));
        }
        // Cached prefixes: chunked prefill and prefix reuse, the diagonal
        // falling at every offset within a key tile.
        for (n, prefix) in [
            (1, 63),
            (1, 64),
            (17, 47),
            (64, 64),
            (65, 100),
            (100, 1),
            (37, 300),
        ] {
            v.push(case(2, 14, 2, 64, 16, n, prefix, 0, Gen::Randn));
        }
        v.push(case(2, 12, 2, 128, 32, 50, 80, 0, Gen::Randn));
        // A block size that is not a power of two: v3 and v5 run v2's kernel
        // and v4 runs v1's (kernels::prefill_attention::kernel_for).
        v.push(case(2, 12, 2, 128, 24, 90, 30, 1, Gen::Randn));
        // Ragged batches mixing lengths and prefixes.
        v.push(case(5, 14, 2, 64, 16, 200, 0, 1, Gen::Randn));
        v.push(case(5, 12, 2, 128, 32, 150, 120, 1, Gen::Randn));
        v.push(case(7, 28, 4, 128, 8, 70, 40, 1, Gen::Randn));
        // GQA groups 1, 5, 6, 7, 8, 16.
        for (q, kv) in [(4, 4), (10, 2), (12, 2), (14, 2), (16, 2), (16, 1)] {
            v.push(case(3, q, kv, 128, 16, 90, 30, 1, Gen::Randn));
        }
        // Every compiled head_dim.
        for &(d, _) in HEAD_DIMS {
            v.push(case(2, 8, 2, d, 16, 77, 20, 1, Gen::Randn));
        }
        for gen in Gen::ALL {
            v.push(case(3, 14, 2, 64, 16, 70, 10, 1, gen));
        }
        // Long (as long as a full reference allows): a whole prompt, a ragged
        // batch, a chunk after a long prefix.
        v.push(case(1, 14, 2, 64, 32, 1400, 0, 0, Gen::Randn));
        v.push(case(2, 12, 2, 128, 16, 600, 50, 1, Gen::Randn));
        v.push(case(1, 28, 4, 128, 16, 64, 4000, 0, Gen::Randn));
        v
    }

    fn perf_cases(&self) -> Vec<Case> {
        // (batch, tokens per sequence, q_heads, kv_heads, head_dim): Qwen2-1.5B
        // (12/2, d128), -0.5B (14/2, d64) and -72B's head layout (32/8 is
        // Qwen2-72B's 64/8 at tensor parallel 2). Whole prompts, no prefix.
        const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
            (4, 4096, 12, 2, 128),
            (4, 4096, 14, 2, 64),
            (1, 16384, 12, 2, 128),
            (1, 16384, 32, 8, 128),
            (16, 1024, 14, 2, 64),
        ];
        SHAPES
            .iter()
            .map(|&(b, n, q, kv, d)| {
                Case::new()
                    .with("batch", b)
                    .with("q_heads", q)
                    .with("kv_heads", kv)
                    .with("head_dim", d)
                    .with("block_size", 16)
                    .with("q_len", n)
                    .with("prefix", 0)
                    .with("pool", 1)
            })
            .collect()
    }

    fn random_case(&self, rng: &mut SmallRng) -> Case {
        let kv = rng.random_range(1..=4);
        let d = HEAD_DIMS.choose(rng).map_or(64, |(d, _)| *d);
        // Groups up to 16 while q_heads * head_dim <= 2048: the reference of
        // the largest draw stays within REF_BUDGET (compared in full).
        let group = rng.random_range(1..=(2048 / (kv * d)).clamp(1, 16));
        let q_len = if rng.random::<bool>() {
            *[1, 7, 15, 16, 17, 63, 64, 65, 128]
                .choose(rng)
                .unwrap_or(&1)
        } else {
            rng.random_range(1..=200)
        };
        let prefix = if rng.random::<bool>() {
            0
        } else {
            rng.random_range(0..=300)
        };
        let mut c = case(
            rng.random_range(1..=4),
            kv * group,
            kv,
            d,
            *[8, 16, 32].choose(rng).unwrap_or(&16),
            q_len,
            prefix,
            rng.random_range(0..=1),
            *Gen::ALL.choose(rng).unwrap_or(&Gen::Randn),
        );
        c.set("seed", rng.random::<u32>());
        c
    }

    fn tolerance(&self, dtype: DType) -> Tolerance {
        // Outputs rounded once, plus P rounded to bf16/f16 before P V: a
        // relative error of at most 2^-9 (bf16) per weight, compared against
        // the magnitude sum_j p_j |v_j| (the `scale` of the comparison).
        rounded_once(dtype)
    }

    fn bytes_moved(&self, case: &Case, dtype: DType) -> Result<u64, CaseError> {
        let p = params(case)?;
        let e = dtype.size_bytes() as u64;
        // With ragged=0 every sequence has q_len new tokens after `prefix` (the perf cases).
        let q_tokens = (p.batch * p.q_len) as u64;
        let kv_tokens = (p.batch * (p.prefix + p.q_len)) as u64;
        let q_row = (p.q_heads * p.head_dim) as u64 * e;
        let kv_row = (p.kv_heads * p.head_dim) as u64 * e;
        let mut b = 0;
        b += q_tokens * q_row; // read q
        b += 2 * kv_tokens * kv_row; // read K and V once (per kv head)
        b += q_tokens * q_row; // write out
        b += (p.batch * (p.prefix + p.q_len).div_ceil(p.block_size)) as u64 * 4; // live block-table entries
        b += (2 * p.batch + 1) as u64 * 4; // cu_seqlens_q and kv_lens
        Ok(b)
    }

    fn flops(&self, case: &Case) -> Result<u64, CaseError> {
        let p = params(case)?;
        // Per query head and causal (query, key) pair: q.k and p.v, head_dim
        // multiply-adds each, 2 flops per multiply-add.
        let pairs = p.batch as u64 * causal_pairs(p.q_len, p.prefix);
        Ok(2 * 2 * pairs * (p.q_heads * p.head_dim) as u64)
    }

    crate::dtype_dispatch!();
}

/// A case's inputs on the host, as stored (rounded to the dtype).
struct Inputs {
    /// Per sequence: new tokens, cached prefix, their sum (kv_lens).
    q_lens: Vec<usize>,
    prefixes: Vec<usize>,
    kv_lens: Vec<usize>,
    /// cu_seqlens_q [batch + 1].
    cu: Vec<usize>,
    /// [batch, max_blocks_per_seq]
    tables: Vec<i32>,
    /// [num_blocks, block_size, kv_heads, head_dim], NaN in every slot without a live token.
    kc: Vec<f64>,
    vc: Vec<f64>,
    /// [total_q, q_heads, head_dim]
    q: Vec<f64>,
    scale: f64,
}

fn inputs(p: &Params, case: &Case, dtype: DType) -> Result<Inputs, RunError> {
    let (g, mut rng) = gen::from_case(case)?;
    let (bs, mbps, nb) = (p.block_size, p.max_blocks_per_seq(), p.num_blocks());
    let row = p.kv_heads * p.head_dim; // elements per cache slot

    // Per sequence: new tokens and cached prefix.
    let (q_lens, prefixes): (Vec<usize>, Vec<usize>) = (0..p.batch)
        .map(|b| {
            if p.ragged && b > 0 {
                (
                    rng.random_range(1..=p.q_len),
                    rng.random_range(0..=p.prefix),
                )
            } else {
                (p.q_len, p.prefix)
            }
        })
        .unzip();
    let kv_lens: Vec<usize> = q_lens.iter().zip(&prefixes).map(|(q, p)| q + p).collect();
    let mut cu = vec![0usize; p.batch + 1];
    for b in 0..p.batch {
        cu[b + 1] = cu[b] + q_lens[b];
    }

    // Block tables: a random permutation of the pool, dealt out in order;
    // entries past a sequence's last block hold stale (valid) ids.
    let mut perm: Vec<i32> = (0..nb as i32).collect();
    perm.shuffle(&mut rng);
    let mut next = 0;
    let mut tables = vec![0i32; p.batch * mbps];
    for b in 0..p.batch {
        let used = kv_lens[b].div_ceil(bs);
        for j in 0..mbps {
            tables[b * mbps + j] = if j < used {
                next += 1;
                perm[next - 1]
            } else {
                perm[rng.random_range(0..nb)]
            };
        }
    }

    // Caches: NaN except live tokens (prefix and new alike), drawn in one go
    // and scattered through the block tables.
    let live: usize = kv_lens.iter().sum();
    let kvals = g.fill(&mut rng, live * row, row, LARGE_QK);
    let vvals = g.fill(&mut rng, live * row, row, LARGE_V);
    let mut owner = vec![usize::MAX; nb * bs]; // slot -> live token index
    let mut src = 0;
    for b in 0..p.batch {
        for j in 0..kv_lens[b] {
            owner[tables[b * mbps + j / bs] as usize * bs + j % bs] = src;
            src += 1;
        }
    }
    let scatter = |vals: &[f64]| -> Vec<f64> {
        let mut c = vec![f64::NAN; nb * bs * row];
        c.par_chunks_mut(row)
            .zip(owner.par_iter())
            .for_each(|(dst, &o)| {
                if o != usize::MAX {
                    for (d, s) in dst.iter_mut().zip(&vals[o * row..(o + 1) * row]) {
                        *d = dtype.round(*s);
                    }
                }
            });
        c
    };
    let (kc, vc) = (scatter(&kvals), scatter(&vvals));
    drop((kvals, vvals, owner));
    let mut q = g.fill(
        &mut rng,
        cu[p.batch] * p.q_heads * p.head_dim,
        p.head_dim,
        LARGE_QK,
    );
    gen::round_all(&mut q, dtype);
    Ok(Inputs {
        q_lens,
        prefixes,
        kv_lens,
        cu,
        tables,
        kc,
        vc,
        q,
        scale: 1.0 / (p.head_dim as f64).sqrt(),
    })
}

/// What the reference computed, for the rows it computed.
struct Want {
    /// Rows of out (global indices, ascending).
    rows: Vec<usize>,
    /// [rows, q_heads, head_dim]
    out: Vec<f64>,
    /// `sum_j p_j |v_j|` per output: the same attention over |V|, the size of
    /// the averaged terms, which the rounding of p and of the f32 sums scales with.
    mag: Vec<f64>,
}

/// The reference over runs of rows in parallel; a sample of rows when the
/// whole reference would cost more than `budget` (see the module docs).
fn reference(p: &Params, x: &Inputs, budget: u64) -> Result<Want, RunError> {
    let mbps = p.max_blocks_per_seq();
    let per_q = p.q_heads * p.head_dim;
    let (runs, _stride) = ref_plan(&x.q_lens, &x.prefixes, p.q_heads, p.head_dim, budget);
    let cache_dims = (p.num_blocks(), p.block_size, p.kv_heads, p.head_dim);
    let vc_abs: Vec<f64> = x.vc.par_iter().map(|v| v.abs()).collect();
    let parts: Vec<[Vec<f64>; 2]> = runs
        .par_iter()
        .map(|&(b, i0, i1)| -> Result<[Vec<f64>; 2], RunError> {
            let n = i1 - i0;
            let r0 = x.cu[b] + i0;
            let qs = view3(
                &x.q[r0 * per_q..(r0 + n) * per_q],
                (n, p.q_heads, p.head_dim),
            );
            let table = ArrayView2::from_shape((1, mbps), &x.tables[b * mbps..(b + 1) * mbps])
                .expect("one table row is max_blocks_per_seq long");
            // Rows i0..i1 are the last n queries of the context cut after row
            // i1 - 1: query i keeps its position prefix + i.
            let ctx = [x.prefixes[b] + i1];
            let kv = view4(&x.kc, cache_dims);
            let run = |v: &[f64]| {
                reference::prefill_attention::prefill_paged(
                    qs,
                    kv,
                    view4(v, cache_dims),
                    table,
                    &ctx,
                    &[0, n],
                    x.scale,
                )
            };
            Ok([flat(run(&x.vc)?), flat(run(&vc_abs)?)])
        })
        .collect::<Result<_, _>>()?;
    let rows = runs
        .iter()
        .flat_map(|&(b, i0, i1)| (x.cu[b] + i0)..(x.cu[b] + i1))
        .collect();
    let out = parts.iter().flat_map(|p| p[0].iter().copied()).collect();
    let mag = parts.iter().flat_map(|p| p[1].iter().copied()).collect();
    Ok(Want { rows, out, mag })
}

fn run_t<T: Stored>(
    gpu: &Gpu,
    case: &Case,
    sabotage: Sabotage,
    tol: Tolerance,
    variant: &str,
) -> Result<Metrics, RunError> {
    let p = params(case)?;
    let x = inputs(&p, case, T::DTYPE)?;
    let want = reference(&p, &x, REF_BUDGET)?;
    let (mbps, per_q, total) = (
        p.max_blocks_per_seq(),
        p.q_heads * p.head_dim,
        x.cu[p.batch],
    );

    let mut tables = x.tables.clone();
    if sabotage == Sabotage::ShiftBlockTable {
        tables.chunks_mut(mbps).for_each(|r| r.rotate_left(1));
    }
    let to_i32 = |v: &[usize]| -> Vec<i32> { v.iter().map(|&n| n as i32).collect() };
    let gq = Guarded::input(gpu, "q", to_storage::<T>(&x.q))?;
    let gk = Guarded::input(gpu, "k_cache", to_storage::<T>(&x.kc))?;
    let gv = Guarded::input(gpu, "v_cache", to_storage::<T>(&x.vc))?;
    let gcu = Guarded::input(gpu, "cu_seqlens_q", to_i32(&x.cu))?;
    let gl = Guarded::input(gpu, "kv_lens", to_i32(&x.kv_lens))?;
    let gt = Guarded::input(gpu, "block_tables", tables)?;
    let mut gout = Guarded::<T>::output(gpu, "out", total * per_q)?;
    // OneRowFewer launches one sequence fewer: its rows keep the NaN poison.
    let seqs = sabotage.rows(p.batch);
    if sabotage.launches() {
        let d = PrefillAttentionDims {
            batch: seqs,
            total_q: x.cu[seqs],
            max_q_len: x.q_lens[..seqs].iter().copied().max().unwrap_or(0),
            q_heads: p.q_heads,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
            block_size: p.block_size,
            num_blocks: p.num_blocks(),
            max_blocks_per_seq: mbps,
            scale: x.scale as f32,
        };
        kernels::prefill_attention::prefill_attention(
            gpu,
            &mut gout.view_mut(x.cu[seqs] * per_q),
            &gq.view(x.cu[seqs] * per_q),
            &gk.full(),
            &gv.full(),
            &gcu.view(seqs + 1),
            &gl.view(seqs),
            &gt.view(seqs * mbps),
            d,
            variant,
        )?;
    }
    drop(x);
    let shape = [total, p.q_heads, p.head_dim];
    let inputs: [&dyn Verify; 6] = [&gq, &gk, &gv, &gcu, &gl, &gt];
    finish_rows(gpu, sabotage, &mut gout, shape, &want, &inputs, tol)
}

/// `op::finish` for one output compared on the reference's rows (all rows
/// unless the case was sampled): apply a write-past-end sabotage,
/// synchronize, read back, compare those rows (mismatch indices are rows of
/// the full tensor), require every other row to be finite, and verify the
/// guards and the inputs.
fn finish_rows<T: Stored>(
    gpu: &Gpu,
    sabotage: Sabotage,
    out: &mut Guarded<T>,
    shape: [usize; 3],
    want: &Want,
    inputs: &[&dyn Verify],
    tol: Tolerance,
) -> Result<Metrics, RunError> {
    let rows = &want.rows;
    if sabotage == Sabotage::WritePastEnd {
        out.write_past_end(gpu, T::from_f64(1.0))?;
    }
    gpu.synchronize()?;
    let (got, violations) = out.read(gpu)?;
    let got = to_f64(&got);
    let per_row = shape[1] * shape[2];
    let picked: Vec<f64> = rows
        .iter()
        .flat_map(|&r| got[r * per_row..(r + 1) * per_row].iter().copied())
        .collect();
    let mut m = Metrics::compare_scaled(
        out.name,
        &[rows.len(), shape[1], shape[2]],
        &picked,
        &want.out,
        Some(&want.mag),
        tol,
    );
    for mm in &mut m.first_mismatches {
        if let Some(r) = mm.index.first_mut() {
            *r = rows[*r];
        }
    }
    violations.into_iter().for_each(|v| m.violation(v));
    if rows.len() < shape[0] {
        let mut sampled = vec![false; shape[0]];
        rows.iter().for_each(|&r| sampled[r] = true);
        let bad: Vec<usize> = (0..shape[0])
            .into_par_iter()
            .filter(|&r| {
                !sampled[r]
                    && got[r * per_row..(r + 1) * per_row]
                        .iter()
                        .any(|x| !x.is_finite())
            })
            .collect();
        if let Some(first) = bad.first() {
            m.violation(format!(
                "{}: {} rows outside the reference sample hold NaN or Inf (first: row {first})",
                out.name,
                bad.len()
            ));
        }
    }
    for i in inputs {
        i.verify_all(gpu)?.into_iter().for_each(|v| m.violation(v));
    }
    Ok(m)
}

/// One input set: [q, out, k_cache, v_cache], cu_seqlens_q, kv_lens, block tables.
type PfSet<T> = (
    [CudaSlice<T>; 4],
    CudaSlice<i32>,
    CudaSlice<i32>,
    CudaSlice<i32>,
);

struct PfBench<T> {
    sets: Vec<PfSet<T>>,
    d: PrefillAttentionDims,
    variant: &'static str,
}

impl<T: Stored> Bench for PfBench<T> {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError> {
        let d = self.d;
        let qn = d.total_q * d.q_heads * d.head_dim;
        let c = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
        let ([q, out, kc, vc], cu, lens, tables) = &mut self.sets[set];
        kernels::prefill_attention::prefill_attention(
            gpu,
            &mut out.slice_mut(0..qn),
            &q.slice(0..qn),
            &kc.slice(0..c),
            &vc.slice(0..c),
            &cu.slice(0..d.batch + 1),
            &lens.slice(0..d.batch),
            &tables.slice(0..d.batch * d.max_blocks_per_seq),
            d,
            self.variant,
        )
    }
}

/// Every sequence has q_len new tokens after `prefix` (perf cases are not
/// ragged); block tables are a random permutation of the pool.
fn bench_t<T: Stored>(
    gpu: &Gpu,
    case: &Case,
    sets: usize,
    variant: &str,
) -> Result<Box<dyn Bench>, RunError> {
    use rand::SeedableRng;
    let p = params(case)?;
    let mut rng = SmallRng::seed_from_u64(29);
    let (mbps, nb) = (p.max_blocks_per_seq(), p.num_blocks());
    let total = p.batch * p.q_len;
    let d = PrefillAttentionDims {
        batch: p.batch,
        total_q: total,
        max_q_len: p.q_len,
        q_heads: p.q_heads,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
        block_size: p.block_size,
        num_blocks: nb,
        max_blocks_per_seq: mbps,
        scale: 1.0 / (p.head_dim as f32).sqrt(),
    };
    let qn = total * p.q_heads * p.head_dim;
    let c = nb * p.block_size * p.kv_heads * p.head_dim;
    let cu: Vec<i32> = (0..=p.batch).map(|b| (b * p.q_len) as i32).collect();
    let lens = vec![(p.prefix + p.q_len) as i32; p.batch];
    let sets = (0..sets as u64)
        .map(|s| -> Result<_, KernelError> {
            let mut perm: Vec<i32> = (0..nb as i32).collect();
            perm.shuffle(&mut rng);
            let tables: Vec<i32> = perm.into_iter().take(p.batch * mbps).collect();
            Ok((
                [
                    rand_buf::<T>(gpu, qn, 4 * s, -1.0, 1.0)?,
                    rand_buf(gpu, qn, 4 * s + 1, -1.0, 1.0)?,
                    rand_buf(gpu, c, 4 * s + 2, -1.0, 1.0)?,
                    rand_buf(gpu, c, 4 * s + 3, -1.0, 1.0)?,
                ],
                upload(gpu, &cu)?,
                upload(gpu, &lens)?,
                upload(gpu, &tables)?,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(PfBench {
        sets,
        d,
        variant: static_variant(variant),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference work of a plan, in (row, key, head, dim) terms.
    fn plan_work(runs: &[(usize, usize, usize)], prefixes: &[usize], per_key: u64) -> u64 {
        runs.iter()
            .map(|&(b, i0, i1)| {
                (i0..i1)
                    .map(|i| (prefixes[b] + i + 1) as u64 * per_key)
                    .sum::<u64>()
            })
            .sum()
    }

    #[test]
    fn variants_match_the_launcher() {
        let ours: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
        assert_eq!(ours, kernels::prefill_attention::VARIANTS);
        let prod = VARIANTS.iter().find(|v| v.production).map(|v| v.name);
        assert_eq!(prod, Some(kernels::prefill_attention::PRODUCTION));
    }

    #[test]
    fn check_and_random_cases_are_referenced_in_full() {
        // The longest lengths a case can draw bound its reference work.
        let full = |c: &Case| {
            let p = params(c).unwrap();
            let (runs, stride) = ref_plan(
                &vec![p.q_len; p.batch],
                &vec![p.prefix; p.batch],
                p.q_heads,
                p.head_dim,
                REF_BUDGET,
            );
            let rows: usize = runs.iter().map(|r| r.2 - r.1).sum();
            stride == 1 && rows == p.batch * p.q_len
        };
        let op = PrefillAttention;
        for c in op.check_cases() {
            assert!(full(&c), "check case {c} would be sampled");
        }
        use rand::SeedableRng;
        let mut rng = SmallRng::seed_from_u64(3);
        for _ in 0..500 {
            let c = op.random_case(&mut rng);
            assert!(full(&c), "random case {c} would be sampled");
        }
    }

    #[test]
    fn perf_cases_sample_within_budget_covering_every_tile_offset() {
        for c in PrefillAttention.perf_cases() {
            let p = params(&c).unwrap();
            let (q_lens, prefixes) = (vec![p.q_len; p.batch], vec![p.prefix; p.batch]);
            let (runs, stride) = ref_plan(&q_lens, &prefixes, p.q_heads, p.head_dim, REF_BUDGET);
            let per_key = (p.q_heads * p.head_dim) as u64;
            // Per sequence, the last group (added to the stride sample) and the
            // rounding of the stride to whole groups cost at most a group of
            // full-context rows each.
            let slack = (2 * p.batch * SAMPLE_ROWS * (p.prefix + p.q_len)) as u64 * per_key;
            assert!(
                plan_work(&runs, &prefixes, per_key) <= REF_BUDGET + slack,
                "{c}"
            );
            for b in 0..p.batch {
                let mine: Vec<usize> = runs
                    .iter()
                    .filter(|r| r.0 == b)
                    .flat_map(|r| r.1..r.2)
                    .collect();
                assert_eq!(mine.first(), Some(&0), "{c}");
                assert_eq!(mine.last(), Some(&(p.q_len - 1)), "{c}");
                if stride > 1 && p.q_len >= 64 * stride {
                    let offsets: std::collections::HashSet<usize> =
                        mine.iter().map(|i| i % 64).collect();
                    assert_eq!(offsets.len(), 64, "{c}: stride {stride}");
                }
            }
            // Rows in order, each once.
            let flat: Vec<(usize, usize)> = runs.iter().map(|r| (r.0, r.1)).collect();
            assert!(flat.windows(2).all(|w| w[0] < w[1]), "{c}");
        }
    }

    #[test]
    fn chunked_and_sampled_references_equal_one_whole_batch_call() {
        // Ragged, with prefixes, three chunks per long sequence, NaN slots.
        let c = case(3, 4, 2, 64, 8, 75, 13, 1, Gen::Randn);
        let p = params(&c).unwrap();
        let x = inputs(&p, &c, DType::BF16).unwrap();
        let mbps = p.max_blocks_per_seq();
        let dims = (p.num_blocks(), p.block_size, p.kv_heads, p.head_dim);
        let total = x.cu[p.batch];
        let whole = flat(
            reference::prefill_attention::prefill_paged(
                view3(&x.q, (total, p.q_heads, p.head_dim)),
                view4(&x.kc, dims),
                view4(&x.vc, dims),
                ArrayView2::from_shape((p.batch, mbps), &x.tables).unwrap(),
                &x.kv_lens,
                &x.cu,
                x.scale,
            )
            .unwrap(),
        );
        assert!(whole.iter().all(|v| v.is_finite()));
        let per_row = p.q_heads * p.head_dim;
        for budget in [REF_BUDGET, 20_000] {
            let Want { rows, out, mag } = reference(&p, &x, budget).unwrap();
            if budget == REF_BUDGET {
                assert_eq!(rows, (0..total).collect::<Vec<_>>());
            } else {
                assert!(rows.len() < total && rows.windows(2).all(|w| w[0] < w[1]));
                // Each sequence's last row is in the sample.
                assert!(x.cu[1..].iter().all(|&end| rows.contains(&(end - 1))));
            }
            for (k, &r) in rows.iter().enumerate() {
                let got = &out[k * per_row..(k + 1) * per_row];
                assert_eq!(got, &whole[r * per_row..(r + 1) * per_row], "row {r}");
                let m = &mag[k * per_row..(k + 1) * per_row];
                assert!(m.iter().zip(got).all(|(m, w)| *m >= w.abs() - 1e-9));
            }
        }
    }

    #[test]
    fn flops_count_causal_pairs() {
        // One sequence, 2 cached + 3 new tokens: the queries see 3, 4, 5 keys.
        let c = case(1, 2, 1, 64, 16, 3, 2, 0, Gen::Randn);
        assert_eq!(PrefillAttention.flops(&c).unwrap(), 4 * 12 * 2 * 64);
        let c = case(2, 2, 1, 64, 16, 4, 0, 0, Gen::Randn);
        assert_eq!(PrefillAttention.flops(&c).unwrap(), 4 * 2 * 10 * 2 * 64);
    }

    #[test]
    fn unsupported_head_dims_fail_before_the_gpu() {
        let c = case(1, 2, 1, 72, 16, 3, 0, 0, Gen::Randn);
        let e = PrefillAttention.validate(&c).unwrap_err().to_string();
        assert!(e.contains("head_dim=72") && e.contains("one of 64"), "{e}");
    }
}
