//! `rope_kv_store`: RoPE on q (in place) and k, then rotated k and v into the
//! paged cache, in one pass. The k buffer itself is left unchanged (checked).
//!
//! Case keys: tokens, q_heads, kv_heads, head_dim, block_size, max_pos
//! (default 4096), pool (default 3), skip (0/1), theta (default 1e6), gen, seed.
//! Slots and skipped tokens are drawn as in `kv_store`; caches start all NaN.

use crate::case::{Case, CaseError};
use crate::compare::{Metrics, Tolerance};
use crate::gen::{self, Gen};
use crate::guard::Guarded;
use crate::op::par_rows;
use crate::op::{
    finish, rand_buf, rounded_once, static_variant, to_storage, upload, Bench, Expect, Op,
    RunError, Sabotage, Stored, Variant,
};
use crate::shapes::{self, flat, view3};
use cudarc::driver::CudaSlice;
use kernels::rope::RopeTable;
use kernels::rope_kv_store::{RopeKvStoreArgs, RopeKvStoreDims};
use kernels::{DType, Gpu, KernelError};
use ndarray::Array4;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::Rng;

pub struct RopeKvStore;

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v1",
        note: "one launch: 16-byte rotations of q and k (k straight into the cache) and v copy, grid-stride",
        production: false,
    },
    Variant {
        name: "v2",
        note: "no loop and no 64-bit division (v1: 16 slow-path calls): one rotation chunk or v vector a thread, rope v4's launch; bit-identical to v1; on the H100 (2026-11-26) 1.25-1.64x v1 at 1-256 tokens, 0.99-1.07x at 4096-65536",
        production: true,
    },
];

const LARGE: f64 = 3.0e4;

#[derive(Clone, Copy)]
struct Params {
    tokens: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    max_pos: usize,
    pool: usize,
    skip: bool,
    theta: f64,
}

impl Params {
    fn num_blocks(&self) -> usize {
        self.tokens.div_ceil(self.block_size) * self.pool
    }
}

fn params(case: &Case) -> Result<Params, CaseError> {
    let p = Params {
        tokens: case.dim("tokens")?,
        q_heads: case.dim("q_heads")?,
        kv_heads: case.dim("kv_heads")?,
        head_dim: case.dim("head_dim")?,
        block_size: case.dim("block_size")?,
        max_pos: case.parse_or("max_pos", 4096, "a positive integer")?,
        pool: case.parse_or("pool", 3usize, "a positive integer")?.max(1),
        skip: case.flag("skip")?,
        theta: case.parse_or("theta", 1.0e6, "a number")?,
    };
    if p.head_dim % 2 != 0 || p.head_dim > 256 || p.max_pos == 0 {
        return Err(CaseError::Value {
            case: case.to_string(),
            key: if p.max_pos == 0 {
                "max_pos"
            } else {
                "head_dim"
            }
            .into(),
            value: if p.max_pos == 0 { 0 } else { p.head_dim }.to_string(),
            want: "an even head_dim <= 256 and max_pos >= 1".into(),
        });
    }
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn case(
    tokens: usize,
    q: usize,
    kv: usize,
    d: usize,
    bs: usize,
    max_pos: usize,
    skip: u8,
    gen: Gen,
) -> Case {
    Case::new()
        .with("tokens", tokens)
        .with("q_heads", q)
        .with("kv_heads", kv)
        .with("head_dim", d)
        .with("block_size", bs)
        .with("max_pos", max_pos)
        .with("skip", skip)
        .with("gen", gen)
        .with("seed", 6)
}

impl Op for RopeKvStore {
    fn name(&self) -> &'static str {
        "rope_kv_store"
    }
    fn about(&self) -> &'static str {
        "RoPE on q and k, then k and v into the paged KV cache, in one pass"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn keys(&self) -> &'static [&'static str] {
        &[
            "tokens",
            "q_heads",
            "kv_heads",
            "head_dim",
            "block_size",
            "max_pos",
            "pool",
            "skip",
            "theta",
        ]
    }
    fn validate(&self, case: &Case) -> Result<(), CaseError> {
        params(case).map(|_| ())
    }

    fn check_cases(&self) -> Vec<Case> {
        let mut v = Vec::new();
        for d in [2, 8, 64, 80, 96, 128, 256] {
            v.push(case(7, 14, 2, d, 16, 4096, 1, Gen::Randn));
        }
        for (q, kv) in [(1, 1), (12, 2), (28, 4), (64, 8)] {
            for tokens in shapes::TOKENS_CHECK {
                v.push(case(tokens, q, kv, 128, 16, 32768, 1, Gen::Uniform));
            }
        }
        for bs in [8, 32] {
            v.push(case(bs + 1, 14, 2, 64, bs, 4096, 0, Gen::Randn));
        }
        for gen in Gen::ALL {
            v.push(case(5, 12, 2, 128, 16, 32768, 1, gen));
        }
        v
    }

    fn perf_cases(&self) -> Vec<Case> {
        shapes::models_by_tokens(|m, t| {
            Case::new()
                .with("tokens", t)
                .with("q_heads", m.q_heads)
                .with("kv_heads", m.kv_heads)
                .with("head_dim", m.head_dim)
                .with("block_size", 16)
                .with("max_pos", 32768)
                .with("pool", 1)
        })
    }

    fn random_case(&self, rng: &mut SmallRng) -> Case {
        let kv = rng.random_range(1..=4);
        let mut c = case(
            rng.random_range(1..=40),
            kv * rng.random_range(1..=8),
            kv,
            2 * rng.random_range(1..=128),
            *[8, 16, 32].choose(rng).unwrap_or(&16),
            rng.random_range(1..=40000),
            rng.random_range(0..=1),
            *Gen::ALL.choose(rng).unwrap_or(&Gen::Randn),
        );
        c.set("pool", rng.random_range(1..=3));
        c.set("seed", rng.random::<u32>());
        c
    }

    fn tolerance(&self, dtype: DType) -> Tolerance {
        rounded_once(dtype)
    }

    fn bytes_moved(&self, case: &Case, dtype: DType) -> Result<u64, CaseError> {
        let p = params(case)?;
        let e = dtype.size_bytes() as u64;
        let (q, kv) = (
            (p.tokens * p.q_heads * p.head_dim) as u64,
            (p.tokens * p.kv_heads * p.head_dim) as u64,
        );
        let mut b = 0;
        b += 2 * q * e; // read and write q [tokens, q_heads, head_dim]
        b += 2 * kv * e; // read k and v [tokens, kv_heads, head_dim]
        b += 2 * kv * e; // write them into k_cache and v_cache
        b += p.tokens as u64 * (4 + 8); // read positions (i32) and slot_mapping (i64)
        b += (p.tokens * p.head_dim) as u64 * 4; // read one f32 cos|sin row per token
        Ok(b)
    }

    fn flops(&self, case: &Case) -> Result<u64, CaseError> {
        let p = params(case)?;
        // two multiplies and one add per rotated element of q and k
        Ok((p.tokens * (p.q_heads + p.kv_heads) * p.head_dim) as u64 * 3)
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
    let (d, qh, kh) = (p.head_dim, p.q_heads, p.kv_heads);
    let (nq, nk) = (p.tokens * qh * d, p.tokens * kh * d);
    let mut q = g.fill(&mut rng, nq, d, LARGE);
    let mut k = g.fill(&mut rng, nk, d, LARGE);
    let mut v = g.fill(&mut rng, nk, d, LARGE);
    for x in [&mut q, &mut k, &mut v] {
        gen::round_all(x, dtype);
    }
    let positions: Vec<i32> = (0..p.tokens)
        .map(|_| rng.random_range(0..p.max_pos) as i32)
        .collect();
    let slot_mapping =
        super::kv_store::draw_slots(&mut rng, p.tokens, p.num_blocks() * p.block_size, p.skip);

    // Reference: rope then kv_store (rows in parallel for q; the scatter is cheap).
    let [want_q, k_rot] = par_rows(p.tokens, (qh + kh) * d, |r| -> Result<_, RunError> {
        let pos = &positions[r.clone()];
        Ok([
            flat(reference::rope::rope_neox(
                view3(&q[r.start * qh * d..r.end * qh * d], (r.len(), qh, d)),
                pos,
                p.theta,
            )?),
            flat(reference::rope::rope_neox(
                view3(&k[r.start * kh * d..r.end * kh * d], (r.len(), kh, d)),
                pos,
                p.theta,
            )?),
        ])
    })?;
    let nb = p.num_blocks();
    let dims4 = (nb, p.block_size, kh, d);
    let (mut want_kc, mut want_vc) = (
        Array4::from_elem(dims4, f64::NAN),
        Array4::from_elem(dims4, f64::NAN),
    );
    let dims3 = (p.tokens, kh, d);
    reference::kv_store::kv_store(
        view3(&k_rot, dims3),
        view3(&v, dims3),
        &slot_mapping,
        &mut want_kc,
        &mut want_vc,
    )?;
    // f32 rounding of each rotated element scales with its pair's norm (see rope.rs).
    let mut scale_kc = Array4::from_elem(dims4, f64::NAN);
    let mut unused = Array4::from_elem(dims4, f64::NAN);
    let (sq, sk) = (
        super::rope::pair_norms(&q, d),
        super::rope::pair_norms(&k, d),
    );
    reference::kv_store::kv_store(
        view3(&sk, dims3),
        view3(&v, dims3),
        &slot_mapping,
        &mut scale_kc,
        &mut unused,
    )?;
    let (want_kc, want_vc, scale_kc) = (flat(want_kc), flat(want_vc), flat(scale_kc));

    let table = RopeTable::new(gpu, p.max_pos, d, p.theta)?;
    let mut gq = Guarded::inout(gpu, "q", &to_storage::<T>(&q))?;
    let gk = Guarded::input(gpu, "k", to_storage::<T>(&k))?;
    let gv = Guarded::input(gpu, "v", to_storage::<T>(&v))?;
    let gpos = Guarded::input(gpu, "positions", positions)?;
    let gslots = Guarded::input(gpu, "slot_mapping", slot_mapping)?;
    let cache = nb * p.block_size * kh * d;
    let mut gkc = Guarded::<T>::output(gpu, "k_cache", cache)?;
    let mut gvc = Guarded::<T>::output(gpu, "v_cache", cache)?;
    let rows = sabotage.rows(p.tokens);
    if sabotage.launches() {
        let dims = RopeKvStoreDims {
            tokens: rows,
            q_heads: qh,
            kv_heads: kh,
            head_dim: d,
            block_size: p.block_size,
            num_blocks: nb,
        };
        let args = RopeKvStoreArgs {
            q: &mut gq.view_mut(rows * qh * d),
            k: &gk.view(rows * kh * d),
            v: &gv.view(rows * kh * d),
            k_cache: &mut gkc.full_mut(),
            v_cache: &mut gvc.full_mut(),
            positions: &gpos.view(rows),
            slot_mapping: &gslots.view(rows),
        };
        kernels::rope_kv_store::rope_kv_store(gpu, args, &table, dims, variant)?;
    }
    let cshape = vec![nb, p.block_size, kh, d];
    let outputs = vec![
        Expect {
            buf: &mut gq,
            shape: vec![p.tokens, qh, d],
            want: &want_q,
            scale: Some(&sq),
        },
        Expect {
            buf: &mut gkc,
            shape: cshape.clone(),
            want: &want_kc,
            scale: Some(&scale_kc),
        },
        Expect {
            buf: &mut gvc,
            shape: cshape,
            want: &want_vc,
            scale: None,
        },
    ];
    finish(gpu, sabotage, outputs, &[&gk, &gv, &gpos, &gslots], tol)
}

/// One input set: [q, k, v, k_cache, v_cache], positions, slot_mapping.
type RkSet<T> = ([CudaSlice<T>; 5], CudaSlice<i32>, CudaSlice<i64>);

struct RkBench<T> {
    sets: Vec<RkSet<T>>,
    table: RopeTable,
    d: RopeKvStoreDims,
    variant: &'static str,
}

impl<T: Stored> Bench for RkBench<T> {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError> {
        let d = self.d;
        let (nq, nk) = (
            d.tokens * d.q_heads * d.head_dim,
            d.tokens * d.kv_heads * d.head_dim,
        );
        let c = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
        let ([q, k, v, kc, vc], pos, slots) = &mut self.sets[set];
        let args = RopeKvStoreArgs {
            q: &mut q.slice_mut(0..nq),
            k: &k.slice(0..nk),
            v: &v.slice(0..nk),
            k_cache: &mut kc.slice_mut(0..c),
            v_cache: &mut vc.slice_mut(0..c),
            positions: &pos.slice(0..d.tokens),
            slot_mapping: &slots.slice(0..d.tokens),
        };
        kernels::rope_kv_store::rope_kv_store(gpu, args, &self.table, d, self.variant)
    }
}

fn bench_t<T: Stored>(
    gpu: &Gpu,
    case: &Case,
    sets: usize,
    variant: &str,
) -> Result<Box<dyn Bench>, RunError> {
    use rand::SeedableRng;
    let p = params(case)?;
    let mut rng = SmallRng::seed_from_u64(29);
    let nb = p.num_blocks();
    let d = RopeKvStoreDims {
        tokens: p.tokens,
        q_heads: p.q_heads,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
        block_size: p.block_size,
        num_blocks: nb,
    };
    let (nq, nk) = (
        p.tokens * p.q_heads * p.head_dim,
        p.tokens * p.kv_heads * p.head_dim,
    );
    let c = nb * p.block_size * p.kv_heads * p.head_dim;
    let sets = (0..sets as u64)
        .map(|s| -> Result<_, KernelError> {
            let pos: Vec<i32> = (0..p.tokens)
                .map(|_| rng.random_range(0..p.max_pos) as i32)
                .collect();
            let sl = super::kv_store::draw_slots(
                &mut rng,
                p.tokens,
                p.num_blocks() * p.block_size,
                p.skip,
            );
            Ok((
                [
                    rand_buf::<T>(gpu, nq, 5 * s, -1.0, 1.0)?,
                    rand_buf::<T>(gpu, nk, 5 * s + 1, -1.0, 1.0)?,
                    rand_buf::<T>(gpu, nk, 5 * s + 2, -1.0, 1.0)?,
                    rand_buf::<T>(gpu, c, 5 * s + 3, -1.0, 1.0)?,
                    rand_buf::<T>(gpu, c, 5 * s + 4, -1.0, 1.0)?,
                ],
                upload(gpu, &pos)?,
                upload(gpu, &sl)?,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(RkBench {
        sets,
        table: RopeTable::new(gpu, p.max_pos, p.head_dim, p.theta)?,
        d,
        variant: static_variant(variant),
    }))
}
