//! `kv_store`: scatter k, v [tokens, kv_heads, head_dim] into the paged caches
//! [num_blocks, block_size, kv_heads, head_dim] at slot_mapping [tokens].
//!
//! Slots are drawn as a random injection into a pool `pool` times larger than
//! needed; with `skip=1` about a quarter of the tokens (never the last) get
//! slot -1 and must be skipped. The caches start all NaN, so a write to a
//! wrong slot, or a skipped token written anyway, shows as a number where the
//! reference has NaN. The comparison is bit-exact: this is a copy.
//!
//! Case keys: tokens, kv_heads, head_dim, block_size, pool (default 3), skip (0/1), gen, seed.

use crate::case::{Case, CaseError};
use crate::compare::{Metrics, Tolerance};
use crate::gen::{self, Gen};
use crate::guard::Guarded;
use crate::op::{
    finish, rand_buf, static_variant, to_storage, upload, Bench, Expect, Op, RunError, Sabotage,
    Stored, Variant,
};
use crate::shapes::{self, flat, view3};
use cudarc::driver::CudaSlice;
use kernels::kv_store::KvStoreDims;
use kernels::KernelError;
use kernels::{DType, Gpu};
use ndarray::Array4;
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

pub struct KvStore;

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v1",
        note: "one block per token, 16-byte vector copies",
        production: false,
    },
    Variant {
        name: "v2",
        note: "one grid-stride loop over (token, 16-byte vector); faster than v1 only for Qwen2-0.5B prefill on the H100 (2026-11-25)",
        production: false,
    },
    Variant {
        name: "v3",
        note: "no loop: (row vectors, tokens) blocks, k and v loaded before the slot arrives; 1.20-1.66 us at 1-64 tokens on the H100 against v1's 1.40-1.88 (2026-11-26)",
        production: true,
    },
];

const LARGE: f64 = 3.0e4;

struct Params {
    tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    pool: usize,
    skip: bool,
}

impl Params {
    fn num_blocks(&self) -> usize {
        self.tokens.div_ceil(self.block_size) * self.pool
    }
}

fn params(case: &Case) -> Result<Params, CaseError> {
    Ok(Params {
        tokens: case.dim("tokens")?,
        kv_heads: case.dim("kv_heads")?,
        head_dim: case.dim("head_dim")?,
        block_size: case.dim("block_size")?,
        pool: case.parse_or("pool", 3, "a positive integer")?.max(1),
        skip: case.flag("skip")?,
    })
}

fn case(tokens: usize, kv: usize, d: usize, bs: usize, pool: usize, skip: u8, gen: Gen) -> Case {
    Case::new()
        .with("tokens", tokens)
        .with("kv_heads", kv)
        .with("head_dim", d)
        .with("block_size", bs)
        .with("pool", pool)
        .with("skip", skip)
        .with("gen", gen)
        .with("seed", 4)
}

impl Op for KvStore {
    fn name(&self) -> &'static str {
        "kv_store"
    }
    fn about(&self) -> &'static str {
        "write new keys and values into the paged KV cache at slot_mapping (negative = skip)"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn keys(&self) -> &'static [&'static str] {
        &[
            "tokens",
            "kv_heads",
            "head_dim",
            "block_size",
            "pool",
            "skip",
        ]
    }
    fn validate(&self, case: &Case) -> Result<(), CaseError> {
        params(case).map(|_| ())
    }

    fn check_cases(&self) -> Vec<Case> {
        let mut v = Vec::new();
        for tokens in shapes::TOKENS_CHECK {
            for (kv, d) in [(2, 64), (2, 128), (4, 128), (8, 128), (1, 80), (3, 33)] {
                for skip in [0, 1] {
                    v.push(case(tokens, kv, d, 16, 3, skip, Gen::Randn));
                }
            }
        }
        for bs in [8, 16, 32] {
            for tokens in [bs - 1, bs, bs + 1] {
                v.push(case(tokens, 2, 64, bs, 3, 1, Gen::Uniform));
            }
        }
        for gen in Gen::ALL {
            v.push(case(9, 2, 128, 16, 3, 1, gen));
        }
        v
    }

    fn perf_cases(&self) -> Vec<Case> {
        shapes::models_by_tokens(|m, t| case(t, m.kv_heads, m.head_dim, 16, 1, 0, Gen::Randn))
            .into_iter()
            .map(|mut c| {
                c.remove("gen");
                c.remove("seed");
                c
            })
            .collect()
    }

    fn random_case(&self, rng: &mut SmallRng) -> Case {
        let mut c = case(
            rng.random_range(1..=60),
            rng.random_range(1..=8),
            rng.random_range(1..=256),
            *[8, 16, 32].choose(rng).unwrap_or(&16),
            rng.random_range(1..=4),
            rng.random_range(0..=1),
            *Gen::ALL.choose(rng).unwrap_or(&Gen::Randn),
        );
        c.set("seed", rng.random::<u32>());
        c
    }

    fn tolerance(&self, _dtype: DType) -> Tolerance {
        Tolerance::EXACT
    }

    fn bytes_moved(&self, case: &Case, dtype: DType) -> Result<u64, CaseError> {
        let p = params(case)?;
        let n = (p.tokens * p.kv_heads * p.head_dim) as u64;
        let e = dtype.size_bytes() as u64;
        let mut b = 0;
        b += 2 * n * e; // read k and v [tokens, kv_heads, head_dim]
        b += 2 * n * e; // write them into k_cache and v_cache
        b += p.tokens as u64 * 8; // read slot_mapping [tokens] i64
        Ok(b)
    }

    fn flops(&self, _case: &Case) -> Result<u64, CaseError> {
        Ok(0)
    }

    crate::dtype_dispatch!();
}

/// Distinct random slots for `tokens` tokens, a shuffled prefix of a pool of
/// `num_slots`; with `skip` about a quarter of the tokens (never the last, so
/// "one row fewer" is always visible) get -1. Shared with `rope_kv_store`.
pub(crate) fn draw_slots(
    rng: &mut SmallRng,
    tokens: usize,
    num_slots: usize,
    skip: bool,
) -> Vec<i64> {
    let mut pool: Vec<i64> = (0..num_slots as i64).collect();
    pool.shuffle(rng);
    (0..tokens)
        .map(|t| {
            if skip && t + 1 < tokens && rng.random_range(0..4) == 0 {
                -1
            } else {
                pool[t]
            }
        })
        .collect()
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
    let row = p.kv_heads * p.head_dim;
    let n = p.tokens * row;
    let mut k = g.fill(&mut rng, n, row, LARGE); // [tokens, kv_heads, head_dim]
    let mut v = g.fill(&mut rng, n, row, LARGE);
    gen::round_all(&mut k, dtype);
    gen::round_all(&mut v, dtype);
    let num_blocks = p.num_blocks();
    let num_slots = num_blocks * p.block_size;
    let slots = draw_slots(&mut rng, p.tokens, num_slots, p.skip);

    let cache_dims = (num_blocks, p.block_size, p.kv_heads, p.head_dim);
    let mut want_k = Array4::from_elem(cache_dims, f64::NAN);
    let mut want_v = Array4::from_elem(cache_dims, f64::NAN);
    let dims3 = (p.tokens, p.kv_heads, p.head_dim);
    reference::kv_store::kv_store(
        view3(&k, dims3),
        view3(&v, dims3),
        &slots,
        &mut want_k,
        &mut want_v,
    )?;
    let (want_k, want_v) = (flat(want_k), flat(want_v));

    let gk = Guarded::input(gpu, "k", to_storage::<T>(&k))?;
    let gv = Guarded::input(gpu, "v", to_storage::<T>(&v))?;
    let gslots = Guarded::input(gpu, "slot_mapping", slots)?;
    let mut gkc = Guarded::<T>::output(gpu, "k_cache", num_slots * row)?;
    let mut gvc = Guarded::<T>::output(gpu, "v_cache", num_slots * row)?;
    let rows = sabotage.rows(p.tokens);
    if sabotage.launches() {
        let d = KvStoreDims {
            tokens: rows,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
            block_size: p.block_size,
            num_blocks,
        };
        kernels::kv_store::kv_store(
            gpu,
            &mut gkc.full_mut(),
            &mut gvc.full_mut(),
            &gk.view(rows * row),
            &gv.view(rows * row),
            &gslots.view(rows),
            d,
            variant,
        )?;
    }
    let shape = vec![num_blocks, p.block_size, p.kv_heads, p.head_dim];
    let outputs = vec![
        Expect {
            buf: &mut gkc,
            shape: shape.clone(),
            want: &want_k,
            scale: None,
        },
        Expect {
            buf: &mut gvc,
            shape,
            want: &want_v,
            scale: None,
        },
    ];
    finish(gpu, sabotage, outputs, &[&gk, &gv, &gslots], tol)
}

struct KvBench<T> {
    /// Per set: k, v, k_cache, v_cache, slot_mapping.
    sets: Vec<([CudaSlice<T>; 4], CudaSlice<i64>)>,
    d: KvStoreDims,
    variant: &'static str,
}

impl<T: Stored> Bench for KvBench<T> {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError> {
        let d = self.d;
        let n = d.tokens * d.kv_heads * d.head_dim;
        let c = d.num_blocks * d.block_size * d.kv_heads * d.head_dim;
        let ([k, v, kc, vc], slots) = &mut self.sets[set];
        kernels::kv_store::kv_store(
            gpu,
            &mut kc.slice_mut(0..c),
            &mut vc.slice_mut(0..c),
            &k.slice(0..n),
            &v.slice(0..n),
            &slots.slice(0..d.tokens),
            d,
            self.variant,
        )
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
    let mut rng = SmallRng::seed_from_u64(19);
    let num_blocks = p.num_blocks();
    let d = KvStoreDims {
        tokens: p.tokens,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
        block_size: p.block_size,
        num_blocks,
    };
    let (n, c) = (
        p.tokens * p.kv_heads * p.head_dim,
        num_blocks * p.block_size * p.kv_heads * p.head_dim,
    );
    let sets = (0..sets as u64)
        .map(|s| -> Result<_, KernelError> {
            let pool = draw_slots(&mut rng, p.tokens, num_blocks * p.block_size, p.skip);
            Ok((
                [
                    rand_buf::<T>(gpu, n, 4 * s, -1.0, 1.0)?,
                    rand_buf(gpu, n, 4 * s + 1, -1.0, 1.0)?,
                    rand_buf(gpu, c, 4 * s + 2, -1.0, 1.0)?,
                    rand_buf(gpu, c, 4 * s + 3, -1.0, 1.0)?,
                ],
                upload(gpu, &pool)?,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(KvBench {
        sets,
        d,
        variant: static_variant(variant),
    }))
}
