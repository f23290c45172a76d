//! `paged_attention`: decode attention, one query token per sequence, over a
//! paged KV cache with GQA.
//!
//! Every check draws its block tables as random permutations of a pool
//! `pool` times larger than needed (default 3), leaves stale but valid block
//! ids in the unused table entries, and fills every cache slot that holds no
//! live token with NaN: a kernel that reads past a context length, or a wrong
//! block, turns NaN. With `ragged=1` the first sequence has `ctx` tokens and
//! the others a random count in 1..=ctx.
//!
//! Case keys: batch, q_heads, kv_heads, head_dim, block_size, ctx, ragged
//! (0/1), pool, max_split (the launcher's `max_split_tokens`, default 0 = no
//! cap; the engine caps its ragged batches), gen, seed. Softmax scale
//! 1/sqrt(head_dim).

use crate::case::{Case, CaseError};
use crate::compare::{Metrics, Tolerance};
use crate::gen::{self, Gen};
use crate::guard::Guarded;
use crate::op::par_rows;
use crate::op::static_variant;
use crate::op::{
    finish, rand_buf, rounded_once, to_storage, upload, Bench, Expect, Op, RunError, Sabotage,
    Stored, Variant,
};
use crate::shapes::{flat, view3, view4};
use cudarc::driver::CudaSlice;
use kernels::paged_attention::PagedAttentionDims;
use kernels::KernelError;
use kernels::{DType, Gpu};
use ndarray::ArrayView2;
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rayon::prelude::*;

pub struct PagedAttention;

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v1",
        note: "one block per (sequence, query head), 4 warps of online softmax, no split-KV",
        production: false,
    },
    Variant {
        name: "v2",
        note: "split-KV over (kv head, sequence, split), the GQA group served from one K/V read, 16-byte loads, log-sum-exp merge",
        production: false,
    },
    Variant {
        name: "v3",
        note: "v2's grid on tensor cores: mma.m16n8k16 for Q.K^T and P.V, per-warp cp.async rings, online softmax in registers, one resident wave of splits (f32 runs v2)",
        production: false,
    },
    // v4 (the last block of a split sequence merging the partials) was
    // slower everywhere and reverted: CHALLENGES #16.
    Variant {
        name: "v5",
        note: "v3 with a quarter of its instructions: one block-table load per 16-token chunk (power-of-two blocks >= 16; others run v3), ex2.approx, rescale only when the max grows, masking only the last chunk, block ids in batches of 32 chunks, loop-invariant copy offsets",
        production: false,
    },
    // v6 (v5 merging in its last split block, isolated from v4's other
    // change) was slower again, by 2.2 us at batch 1, and reverted:
    // CHALLENGES #28.
    Variant {
        name: "v7",
        note: "v5's kernel with paged_attention_merge2: each split's (max, sum) loaded by the block in parallel, weights computed once in shared memory, the weighted sum over splits with independent loads (the old merge chained dependent loads per split)",
        production: false,
    },
    Variant {
        name: "v8",
        note: "v7 with the split kernel's end-of-split rows padded to head_dim + 8 floats (ncu: 6.2-way shared-memory bank conflicts in v5's finish at batch 64); one change against v7, timed alone",
        production: false,
    },
    Variant {
        name: "v9",
        note: "v8's kernel with a deep cp.async ring (7 chunks in flight per warp at head_dim <= 96, 5 at 128) under a plan of the fewest splits that give nine in ten SMs a block: no split and no merge from batch x kv_heads >= 119 (v8 cuts batch 64 x 1024 of the 0.5B layout into 8 splits of 128 tokens); v8's ring where the deep one would not keep every block resident",
        production: true,
    },
];

/// `large`: q and k near ±4 (scores in the tens: a sharply peaked softmax),
/// v near ±1e4.
const LARGE_QK: f64 = 4.0;
const LARGE_V: f64 = 1.0e4;

#[derive(Clone, Copy)]
struct Params {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    ctx: usize,
    ragged: bool,
    pool: usize,
    /// Launcher cap on tokens per split (0: none).
    max_split: usize,
    /// NaN in live data: q of sequence 0, head 0, and K of the last
    /// sequence's first token, kv head 0 (those outputs must come out NaN).
    nan: bool,
}

impl Params {
    fn max_blocks_per_seq(&self) -> usize {
        self.ctx.div_ceil(self.block_size).max(1)
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
        ctx: case.parse("ctx", "a context length >= 0")?,
        ragged: case.flag("ragged")?,
        pool: case.parse_or("pool", 3usize, "a positive integer")?.max(1),
        max_split: case.parse_or("max_split", 0usize, "tokens per split, 0 for no cap")?,
        nan: case.parse_or("nan", 0u8, "0 or 1")? == 1,
    };
    let bad = |key: &str, value: usize, want: &str| CaseError::Value {
        case: case.to_string(),
        key: key.into(),
        value: value.to_string(),
        want: want.into(),
    };
    if p.q_heads % p.kv_heads != 0 {
        return Err(bad("q_heads", p.q_heads, "a multiple of kv_heads"));
    }
    if p.head_dim > 256 {
        return Err(bad("head_dim", p.head_dim, "at most 256"));
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
    ctx: usize,
    ragged: u8,
    gen: Gen,
) -> Case {
    Case::new()
        .with("batch", batch)
        .with("q_heads", q)
        .with("kv_heads", kv)
        .with("head_dim", d)
        .with("block_size", bs)
        .with("ctx", ctx)
        .with("ragged", ragged)
        .with("gen", gen)
        .with("seed", 5)
}

impl Op for PagedAttention {
    fn name(&self) -> &'static str {
        "paged_attention"
    }
    fn about(&self) -> &'static str {
        "decode attention over a paged KV cache (one query per sequence, GQA)"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn keys(&self) -> &'static [&'static str] {
        &[
            "batch",
            "q_heads",
            "kv_heads",
            "head_dim",
            "block_size",
            "ctx",
            "ragged",
            "pool",
            "max_split",
            "nan",
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
        // Context lengths around block boundaries, for each block size.
        for bs in [8, 16, 32] {
            for ctx in [0, 1, bs - 1, bs, bs + 1, 5 * bs + 3] {
                v.push(case(3, 14, 2, 64, bs, ctx, 0, Gen::Randn));
            }
        }
        // GQA groups 1, 5, 6, 7, 8, 16.
        for (q, kv) in [(4, 4), (10, 2), (12, 2), (14, 2), (28, 4), (16, 2), (16, 1)] {
            v.push(case(4, q, kv, 128, 16, 100, 1, Gen::Randn));
        }
        for d in [64, 80, 96, 128, 256] {
            v.push(case(2, 8, 2, d, 16, 77, 1, Gen::Randn));
        }
        for gen in Gen::ALL {
            v.push(case(3, 14, 2, 64, 16, 40, 1, gen));
        }
        // Ragged batches under a split cap (the engine's decode): long
        // sequences cut into 64- and 128-token splits, short ones in one.
        for (cap, q, kv, d) in [(64, 14, 2, 64), (128, 28, 4, 128)] {
            v.push(case(9, q, kv, d, 16, 700, 1, Gen::Randn).with("max_split", cap));
        }
        // NaN in live q and K must come out NaN, never a plausible 0 (a
        // small batch splits; so does the cap), CHALLENGES #17.
        v.push(case(3, 14, 2, 64, 16, 300, 1, Gen::Randn).with("nan", 1));
        v.push(
            case(4, 28, 4, 128, 16, 500, 0, Gen::Randn)
                .with("nan", 1)
                .with("max_split", 64),
        );
        // Batches that fill the card (v9's plans on an H100): 128 blocks,
        // one split each with the deep ring; 400 blocks at head_dim 64 and
        // 140 at 128, more than the deep ring keeps resident, so v8's ring.
        v.push(case(64, 14, 2, 64, 16, 600, 1, Gen::Randn));
        v.push(case(200, 14, 2, 64, 16, 300, 1, Gen::Randn));
        v.push(case(70, 12, 2, 128, 16, 300, 1, Gen::Randn));
        // Long contexts.
        v.push(case(2, 12, 2, 128, 32, 4097, 1, Gen::Randn));
        v.push(case(1, 28, 4, 128, 16, 32768, 0, Gen::Randn));
        v
    }

    fn perf_cases(&self) -> Vec<Case> {
        // (batch, ctx, q_heads, kv_heads, head_dim): Qwen2-0.5B, -1.5B, -7B, -72B layouts.
        const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
            (1, 1024, 14, 2, 64),
            (8, 512, 14, 2, 64),
            (64, 1024, 14, 2, 64),
            (256, 1024, 14, 2, 64),
            (64, 4096, 12, 2, 128),
            (256, 2048, 28, 4, 128),
            (8, 32768, 64, 8, 128),
        ];
        SHAPES
            .iter()
            .map(|&(b, ctx, q, kv, d)| {
                Case::new()
                    .with("batch", b)
                    .with("q_heads", q)
                    .with("kv_heads", kv)
                    .with("head_dim", d)
                    .with("block_size", 16)
                    .with("ctx", ctx)
                    .with("pool", 1)
            })
            .collect()
    }

    fn random_case(&self, rng: &mut SmallRng) -> Case {
        let kv = rng.random_range(1..=4);
        let mut c = case(
            rng.random_range(1..=6),
            kv * rng.random_range(1..=16),
            kv,
            *[64, 128, 80, 96, 32, 256].choose(rng).unwrap_or(&64),
            *[8, 16, 32].choose(rng).unwrap_or(&16),
            rng.random_range(0..=600),
            rng.random_range(0..=1),
            *Gen::ALL.choose(rng).unwrap_or(&Gen::Randn),
        );
        c.set("seed", rng.random::<u32>());
        c
    }

    fn tolerance(&self, dtype: DType) -> Tolerance {
        rounded_once(dtype)
    }

    fn bytes_moved(&self, case: &Case, dtype: DType) -> Result<u64, CaseError> {
        let p = params(case)?;
        let e = dtype.size_bytes() as u64;
        // With ragged=0 every sequence holds ctx tokens (the perf cases).
        let kv_tokens = (p.batch * p.ctx) as u64;
        let mut b = 0;
        b += 2 * kv_tokens * (p.kv_heads * p.head_dim) as u64 * e; // read K and V once per kv head
        b += (p.batch * p.q_heads * p.head_dim) as u64 * e; // read q
        b += (p.batch * p.q_heads * p.head_dim) as u64 * e; // write out
        b += (p.batch * p.ctx.div_ceil(p.block_size)) as u64 * 4; // read the live block-table entries
        b += p.batch as u64 * 4; // read context_lens
        Ok(b)
    }

    fn flops(&self, case: &Case) -> Result<u64, CaseError> {
        let p = params(case)?;
        // q.k and p.v: 2 flops per multiply-add, head_dim each, per query head and token
        Ok(4 * (p.batch * p.q_heads * p.ctx * p.head_dim) as u64)
    }

    crate::dtype_dispatch!();
}

fn run_t<T: Stored>(
    gpu: &Gpu,
    case: &Case,
    sabotage: Sabotage,
    tol: Tolerance,
    variant: &str,
) -> Result<Metrics, RunError> {
    let p = params(case)?;
    let (g, mut rng) = gen::from_case(case)?;
    let dtype = T::DTYPE;
    let (bs, mbps, nb) = (p.block_size, p.max_blocks_per_seq(), p.num_blocks());
    let row = p.kv_heads * p.head_dim;

    let lens: Vec<i32> = (0..p.batch)
        .map(|b| {
            if p.ragged && b > 0 && p.ctx > 0 {
                rng.random_range(1..=p.ctx) as i32
            } else {
                p.ctx as i32
            }
        })
        .collect();
    // Block tables: a random permutation of the pool, dealt out in order;
    // entries past a sequence's last block hold stale (valid) ids.
    let mut perm: Vec<i32> = (0..nb as i32).collect();
    perm.shuffle(&mut rng);
    let mut next = 0;
    let mut tables = vec![0i32; p.batch * mbps]; // [batch, max_blocks_per_seq]
    for b in 0..p.batch {
        let used = (lens[b] as usize).div_ceil(bs);
        for j in 0..mbps {
            tables[b * mbps + j] = if j < used {
                next += 1;
                perm[next - 1]
            } else {
                perm[rng.random_range(0..nb)]
            };
        }
    }

    // Caches [num_blocks, block_size, kv_heads, head_dim]: NaN except live
    // tokens, whose values are drawn in one go (so `zero_row` zeroes one
    // token) and scattered through the block tables.
    let live: usize = lens.iter().map(|&l| l as usize).sum();
    let kvals = g.fill(&mut rng, live * row, row, LARGE_QK);
    let vvals = g.fill(&mut rng, live * row, row, LARGE_V);
    let mut owner = vec![usize::MAX; nb * bs]; // slot -> live token index
    let mut src = 0;
    for b in 0..p.batch {
        for j in 0..lens[b] as usize {
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
    let (mut kc, vc) = (scatter(&kvals), scatter(&vvals));
    drop((kvals, vvals, owner));
    let qn = p.batch * p.q_heads * p.head_dim;
    let mut q = g.fill(&mut rng, qn, p.head_dim, LARGE_QK); // [batch, q_heads, head_dim]
    gen::round_all(&mut q, dtype);
    if p.nan && qn > 0 {
        q[0] = f64::NAN; // sequence 0, head 0, dim 0
        let last = p.batch - 1;
        if lens[last] > 0 {
            // The last sequence's token 0, kv head 0, dim 0.
            kc[tables[last * mbps] as usize * bs * row] = f64::NAN;
        }
    }
    let scale = 1.0 / (p.head_dim as f64).sqrt();

    // Reference, sequences in parallel. The same attention over |V| gives
    // sum_j p_j |v_j| per output: the magnitude of the averaged terms, which
    // f32 accumulation error scales with (outputs can cancel to near 0).
    let cache_dims = (nb, bs, p.kv_heads, p.head_dim);
    let vc_abs: Vec<f64> = vc.par_iter().map(|x| x.abs()).collect();
    let per_seq = p.q_heads * p.head_dim;
    let [want, scale_out] = par_rows(p.batch, per_seq + ctx_work(p), |r| -> Result<_, RunError> {
        let qs = view3(
            &q[r.start * per_seq..r.end * per_seq],
            (r.len(), p.q_heads, p.head_dim),
        );
        let ts = ArrayView2::from_shape((r.len(), mbps), &tables[r.start * mbps..r.end * mbps])
            .expect("table is batch x max_blocks_per_seq");
        let ls = &lens[r];
        let kv = view4(&kc, cache_dims);
        Ok([
            flat(reference::paged_attention::paged_decode(
                qs,
                kv,
                view4(&vc, cache_dims),
                ts,
                ls,
                scale,
            )?),
            flat(reference::paged_attention::paged_decode(
                qs,
                kv,
                view4(&vc_abs, cache_dims),
                ts,
                ls,
                scale,
            )?),
        ])
    })?;
    drop(vc_abs);

    let uploaded_tables = if sabotage == Sabotage::ShiftBlockTable {
        let mut t = tables.clone();
        t.chunks_mut(mbps).for_each(|r| r.rotate_left(1));
        t
    } else {
        tables
    };
    let gq = Guarded::input(gpu, "q", to_storage::<T>(&q))?;
    let gk = Guarded::input(gpu, "k_cache", to_storage::<T>(&kc))?;
    let gv = Guarded::input(gpu, "v_cache", to_storage::<T>(&vc))?;
    let gt = Guarded::input(gpu, "block_tables", uploaded_tables)?;
    let gl = Guarded::input(gpu, "context_lens", lens)?;
    let mut gout = Guarded::<T>::output(gpu, "out", qn)?;
    let rows = sabotage.rows(p.batch);
    if sabotage.launches() {
        let d = PagedAttentionDims {
            batch: rows,
            q_heads: p.q_heads,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
            block_size: bs,
            num_blocks: nb,
            max_blocks_per_seq: mbps,
            scale: scale as f32,
            max_split_tokens: p.max_split,
        };
        kernels::paged_attention::paged_attention(
            gpu,
            &mut gout.view_mut(rows * per_seq),
            &gq.view(rows * per_seq),
            &gk.full(),
            &gv.full(),
            &gt.view(rows * mbps),
            &gl.view(rows),
            d,
            variant,
        )?;
    }
    let outputs = vec![Expect {
        buf: &mut gout,
        shape: vec![p.batch, p.q_heads, p.head_dim],
        want: &want,
        scale: Some(&scale_out),
    }];
    finish(gpu, sabotage, outputs, &[&gq, &gk, &gv, &gt, &gl], tol)
}

/// Work per sequence in elements, so `par_rows` makes chunks of similar cost.
fn ctx_work(p: Params) -> usize {
    p.q_heads * p.ctx.max(1) * p.head_dim
}

/// One input set: [q, out, k_cache, v_cache], block tables, context lengths.
type PaSet<T> = ([CudaSlice<T>; 4], CudaSlice<i32>, CudaSlice<i32>);

struct PaBench<T> {
    sets: Vec<PaSet<T>>,
    d: PagedAttentionDims,
    variant: &'static str,
}

impl<T: Stored> Bench for PaBench<T> {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError> {
        let d = self.d;
        let qn = d.batch * d.q_heads * d.head_dim;
        let c = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
        let ([q, out, kc, vc], tables, lens) = &mut self.sets[set];
        kernels::paged_attention::paged_attention(
            gpu,
            &mut out.slice_mut(0..qn),
            &q.slice(0..qn),
            &kc.slice(0..c),
            &vc.slice(0..c),
            &tables.slice(0..d.batch * d.max_blocks_per_seq),
            &lens.slice(0..d.batch),
            d,
            self.variant,
        )
    }
}

/// Every sequence holds `ctx` tokens (perf cases are not ragged); block tables
/// are a random permutation of the pool.
fn bench_t<T: Stored>(
    gpu: &Gpu,
    case: &Case,
    sets: usize,
    variant: &str,
) -> Result<Box<dyn Bench>, RunError> {
    use rand::SeedableRng;
    let p = params(case)?;
    let mut rng = SmallRng::seed_from_u64(23);
    let (mbps, nb) = (p.max_blocks_per_seq(), p.num_blocks());
    let d = PagedAttentionDims {
        batch: p.batch,
        q_heads: p.q_heads,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
        block_size: p.block_size,
        num_blocks: nb,
        max_blocks_per_seq: mbps,
        scale: 1.0 / (p.head_dim as f32).sqrt(),
        max_split_tokens: p.max_split,
    };
    let qn = p.batch * p.q_heads * p.head_dim;
    let c = nb * p.block_size * p.kv_heads * p.head_dim;
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
                upload(gpu, &tables)?,
                upload(gpu, &vec![p.ctx as i32; p.batch])?,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(PaBench {
        sets,
        d,
        variant: static_variant(variant),
    }))
}
