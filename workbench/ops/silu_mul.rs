//! `silu_mul`: out [tokens, I] = silu(gate) * up, input [tokens, 2I] = gate | up.
//!
//! Case keys: tokens, inter, gen, seed.

use crate::case::{Case, CaseError};
use crate::compare::{Metrics, Tolerance};
use crate::gen::{self, Gen};
use crate::guard::Guarded;
use crate::op::par_rows;
use crate::op::{
    finish, rand_buf, rounded_once, static_variant, to_storage, Bench, Expect, Op, RunError,
    Sabotage, Stored, Variant,
};
use crate::shapes::{self, flat, view2};
use cudarc::driver::CudaSlice;
use kernels::KernelError;
use kernels::{DType, Gpu};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::Rng;

pub struct SiluMul;

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v1",
        note: "grid-stride elementwise, 16-byte vectors when I is aligned",
        production: false,
    },
    Variant {
        name: "v2",
        note: "4 vectors per thread (1 for small shapes), 32-bit index math, all loads before the stores; 2-4% faster than v1 at 1-8 tokens and 16384 x 18944/29568, slower at 256-4096 tokens on the H100 (2026-11-26)",
        production: false,
    },
    Variant {
        name: "v3",
        note: "v2 with streaming (evict-first) loads and stores: within 1% of v2 everywhere on the H100 (2026-11-26)",
        production: false,
    },
    Variant {
        name: "v4",
        note: "no division: grid (tokens, runs of <= 512 vectors), one vector of gate and up per thread",
        production: false,
    },
    Variant {
        name: "v5",
        note: "v4 with silu on the special function unit (__expf, __fdividef) for bf16/f16: 144 straight-line SASS instructions a thread against v4's 368 with 8 calls; on the H100 (2026-11-26) 1.20-1.28x v1 at 1-8 tokens, 1.02-1.05x at 16384-65536, 10 of 28 cases faster than every peer (v1: 2)",
        production: true,
    },
];

/// `large`: gates near ±80, where a naive exp(-g) overflows f32, and ups near
/// ±80 (products stay inside f16's range).
const LARGE: f64 = 80.0;

fn params(case: &Case) -> Result<(usize, usize), CaseError> {
    Ok((case.dim("tokens")?, case.dim("inter")?))
}

impl Op for SiluMul {
    fn name(&self) -> &'static str {
        "silu_mul"
    }
    fn about(&self) -> &'static str {
        "SwiGLU: silu(gate) * up over the fused gate|up projection"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn keys(&self) -> &'static [&'static str] {
        &["tokens", "inter"]
    }
    fn validate(&self, case: &Case) -> Result<(), CaseError> {
        params(case).map(|_| ())
    }

    fn check_cases(&self) -> Vec<Case> {
        let base = |tokens: usize, inter: usize, gen: Gen| {
            Case::new()
                .with("tokens", tokens)
                .with("inter", inter)
                .with("gen", gen)
                .with("seed", 2)
        };
        let mut v = Vec::new();
        for inter in shapes::ODD_ROWS.iter().chain(&[4864, 8960]) {
            v.push(base(7, *inter, Gen::Randn));
        }
        for inter in [4864, 1025] {
            for gen in Gen::ALL {
                v.push(base(3, inter, gen));
            }
        }
        for tokens in shapes::TOKENS_CHECK {
            v.push(base(tokens, 8960, Gen::Uniform));
        }
        v
    }

    fn perf_cases(&self) -> Vec<Case> {
        shapes::models_by_tokens(|m, t| Case::new().with("tokens", t).with("inter", m.intermediate))
    }

    fn random_case(&self, rng: &mut SmallRng) -> Case {
        Case::new()
            .with("tokens", rng.random_range(1..=40))
            .with("inter", shapes::random_row(rng))
            .with("gen", *Gen::ALL.choose(rng).unwrap_or(&Gen::Randn))
            .with("seed", rng.random::<u32>())
    }

    fn tolerance(&self, dtype: DType) -> Tolerance {
        rounded_once(dtype)
    }

    fn bytes_moved(&self, case: &Case, dtype: DType) -> Result<u64, CaseError> {
        let (t, i) = params(case)?;
        let (n, e) = ((t * i) as u64, dtype.size_bytes() as u64);
        let mut b = 0;
        b += 2 * n * e; // read input [tokens, 2I]
        b += n * e; // write out [tokens, I]
        Ok(b)
    }

    fn flops(&self, case: &Case) -> Result<u64, CaseError> {
        let (t, i) = params(case)?;
        // exp, add, divide, multiply per output element
        Ok((t * i) as u64 * 4)
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
    let (tokens, inter) = params(case)?;
    let (g, mut rng) = gen::from_case(case)?;
    let mut input = g.fill(&mut rng, tokens * 2 * inter, 2 * inter, LARGE); // [tokens, 2I]
    gen::round_all(&mut input, T::DTYPE);
    // Reference in f64 on the rounded inputs, rows in parallel.
    let row = 2 * inter;
    let [want] = par_rows(tokens, row, |r| -> Result<_, RunError> {
        let rows = view2(&input[r.start * row..r.end * row], (r.len(), row));
        Ok([flat(reference::silu_mul::silu_mul(rows)?)])
    })?;

    let gin = Guarded::input(gpu, "input", to_storage::<T>(&input))?;
    // The f64 inputs are the largest host buffer (8 bytes a value; 31 GB at
    // 65536 x 2 x 29568): free them before the outputs are read back.
    drop(input);
    let mut gout = Guarded::<T>::output(gpu, "out", tokens * inter)?;
    let rows = sabotage.rows(tokens);
    if sabotage.launches() {
        kernels::silu_mul::silu_mul(
            gpu,
            &mut gout.view_mut(rows * inter),
            &gin.view(rows * 2 * inter),
            rows,
            inter,
            variant,
        )?;
    }
    let outputs = vec![Expect {
        buf: &mut gout,
        shape: vec![tokens, inter],
        want: &want,
        scale: None,
    }];
    finish(gpu, sabotage, outputs, &[&gin], tol)
}

struct SiluBench<T> {
    /// Per set: input [tokens, 2I], out [tokens, I].
    sets: Vec<[CudaSlice<T>; 2]>,
    tokens: usize,
    inter: usize,
    variant: &'static str,
}

impl<T: Stored> Bench for SiluBench<T> {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError> {
        let (t, i) = (self.tokens, self.inter);
        let [input, out] = &mut self.sets[set];
        kernels::silu_mul::silu_mul(
            gpu,
            &mut out.slice_mut(0..t * i),
            &input.slice(0..2 * t * i),
            t,
            i,
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
    let (tokens, inter) = params(case)?;
    let sets = (0..sets as u64)
        .map(|s| -> Result<[CudaSlice<T>; 2], KernelError> {
            Ok([
                rand_buf(gpu, 2 * tokens * inter, 2 * s, -4.0, 4.0)?,
                rand_buf(gpu, tokens * inter, 2 * s + 1, -1.0, 1.0)?,
            ])
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(SiluBench {
        sets,
        tokens,
        inter,
        variant: static_variant(variant),
    }))
}
