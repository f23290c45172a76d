//! `rope`: NeoX rotary embedding in place on q [tokens, q_heads, head_dim] and
//! k [tokens, kv_heads, head_dim] at random positions in [0, max_pos).
//!
//! Case keys: tokens, q_heads, kv_heads, head_dim, max_pos (default 4096),
//! theta (default 1e6, Qwen2's rope_theta), gen, seed.

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
use kernels::rope::{RopeDims, RopeTable};
use kernels::KernelError;
use kernels::{DType, Gpu};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::Rng;

pub struct Rope;

const VARIANTS: &[Variant] = &[Variant {
    name: "v1",
    note: "one block per token, f32 cos/sin table, scalar pairs",
    production: false,
},
Variant {
    name: "v2",
    note: "grid-stride over (token, head, 16-byte chunk): 16-byte loads of both halves and float4 cos/sin",
    production: false,
},
Variant {
    name: "v3",
    note: "v2 without the loop and its 64-bit divisions: one chunk per thread, (chunks, tokens) blocks, position loaded beside the chunk; 22 of 24 H100 cases faster than FlashInfer (2026-11-26), 72 heads x 1-8 tokens slower (one 576-thread block a token)",
    production: false,
},
Variant {
    name: "v4",
    note: "up to 256 tokens, v3 with blocks of at most 128 threads, a token's chunks spread over grid.y (72 heads: five blocks, not one); v3's launch above; on the H100 (2026-11-26) 72 heads x 1-8 tokens in 1.46-1.54 us against v3's 1.87-1.98, every case faster than every peer",
    production: true,
}];

const LARGE: f64 = 3.0e4;

struct Params {
    tokens: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_pos: usize,
    theta: f64,
}

fn params(case: &Case) -> Result<Params, CaseError> {
    let p = Params {
        tokens: case.dim("tokens")?,
        q_heads: case.dim("q_heads")?,
        kv_heads: case.dim("kv_heads")?,
        head_dim: case.dim("head_dim")?,
        max_pos: case.parse_or("max_pos", 4096, "a positive integer")?,
        theta: case.parse_or("theta", 1.0e6, "a number")?,
    };
    if p.head_dim % 2 != 0 || p.head_dim > 256 {
        return Err(CaseError::Value {
            case: case.to_string(),
            key: "head_dim".into(),
            value: p.head_dim.to_string(),
            want: "even and at most 256".into(),
        });
    }
    if p.max_pos == 0 {
        return Err(CaseError::Value {
            case: case.to_string(),
            key: "max_pos".into(),
            value: "0".into(),
            want: "a positive integer".into(),
        });
    }
    Ok(p)
}

fn case(tokens: usize, q: usize, kv: usize, d: usize, max_pos: usize, gen: Gen) -> Case {
    Case::new()
        .with("tokens", tokens)
        .with("q_heads", q)
        .with("kv_heads", kv)
        .with("head_dim", d)
        .with("max_pos", max_pos)
        .with("gen", gen)
        .with("seed", 3)
}

impl Op for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn about(&self) -> &'static str {
        "rotary position embedding, NeoX style, in place on q and k"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn keys(&self) -> &'static [&'static str] {
        &[
            "tokens", "q_heads", "kv_heads", "head_dim", "max_pos", "theta",
        ]
    }
    fn validate(&self, case: &Case) -> Result<(), CaseError> {
        params(case).map(|_| ())
    }

    fn check_cases(&self) -> Vec<Case> {
        let mut v = Vec::new();
        for d in [2, 8, 64, 80, 96, 128, 256] {
            v.push(case(7, 14, 2, d, 4096, Gen::Randn));
        }
        for (q, kv) in [(1, 1), (12, 2), (28, 4), (64, 8)] {
            v.push(case(5, q, kv, 128, 4096, Gen::Randn));
        }
        for tokens in shapes::TOKENS_CHECK {
            v.push(case(tokens, 14, 2, 64, 32768, Gen::Uniform));
        }
        for gen in Gen::ALL {
            v.push(case(3, 12, 2, 128, 32768, gen));
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
                .with("max_pos", 32768)
        })
    }

    fn random_case(&self, rng: &mut SmallRng) -> Case {
        let kv = rng.random_range(1..=4);
        let d = 2 * rng.random_range(1..=128);
        let mut c = case(
            rng.random_range(1..=40),
            kv * rng.random_range(1..=8),
            kv,
            d,
            rng.random_range(1..=40000),
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
        let qk = (p.tokens * (p.q_heads + p.kv_heads) * p.head_dim) as u64;
        let mut b = 0;
        b += qk * e; // read q and k [tokens, heads, head_dim]
        b += qk * e; // write q and k back, in place
        b += p.tokens as u64 * 4; // read positions [tokens] i32
        b += (p.tokens * p.head_dim) as u64 * 4; // read one f32 cos|sin row per token (at most)
        Ok(b)
    }

    fn flops(&self, case: &Case) -> Result<u64, CaseError> {
        let p = params(case)?;
        // per element: two multiplies and one add
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
    let (nq, nk) = (
        p.tokens * p.q_heads * p.head_dim,
        p.tokens * p.kv_heads * p.head_dim,
    );
    let mut q = g.fill(&mut rng, nq, p.head_dim, LARGE); // [tokens, q_heads, head_dim]
    let mut k = g.fill(&mut rng, nk, p.head_dim, LARGE); // [tokens, kv_heads, head_dim]
    gen::round_all(&mut q, dtype);
    gen::round_all(&mut k, dtype);
    let positions: Vec<i32> = (0..p.tokens)
        .map(|_| rng.random_range(0..p.max_pos) as i32)
        .collect();
    let (d, qh, kh) = (p.head_dim, p.q_heads, p.kv_heads);
    let [want_q, want_k] = par_rows(p.tokens, (qh + kh) * d, |r| -> Result<_, RunError> {
        let pos = &positions[r.clone()];
        let qs = view3(&q[r.start * qh * d..r.end * qh * d], (r.len(), qh, d));
        let ks = view3(&k[r.start * kh * d..r.end * kh * d], (r.len(), kh, d));
        Ok([
            flat(reference::rope::rope_neox(qs, pos, p.theta)?),
            flat(reference::rope::rope_neox(ks, pos, p.theta)?),
        ])
    })?;
    // Each output is x1*cos -+ x2*sin: f32 rounding scales with the pair's
    // norm (which the rotation keeps), not with the possibly cancelled result.
    let (scale_q, scale_k) = (pair_norms(&q, d), pair_norms(&k, d));

    let table = RopeTable::new(gpu, p.max_pos, p.head_dim, p.theta)?;
    let mut gq = Guarded::inout(gpu, "q", &to_storage::<T>(&q))?;
    let mut gk = Guarded::inout(gpu, "k", &to_storage::<T>(&k))?;
    let gpos = Guarded::input(gpu, "positions", positions)?;
    let rows = sabotage.rows(p.tokens);
    if sabotage.launches() {
        let d = RopeDims {
            tokens: rows,
            q_heads: p.q_heads,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
        };
        kernels::rope::rope(
            gpu,
            &mut gq.view_mut(rows * p.q_heads * p.head_dim),
            &mut gk.view_mut(rows * p.kv_heads * p.head_dim),
            &gpos.view(rows),
            &table,
            d,
            variant,
        )?;
    }
    let outputs = vec![
        Expect {
            buf: &mut gq,
            shape: vec![p.tokens, p.q_heads, p.head_dim],
            want: &want_q,
            scale: Some(&scale_q),
        },
        Expect {
            buf: &mut gk,
            shape: vec![p.tokens, p.kv_heads, p.head_dim],
            want: &want_k,
            scale: Some(&scale_k),
        },
    ];
    finish(gpu, sabotage, outputs, &[&gpos], tol)
}

/// sqrt(x[i]^2 + x[i + d/2]^2) for both members of every rotated pair.
pub(crate) fn pair_norms(x: &[f64], head_dim: usize) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out = vec![0.0; x.len()];
    for (o, h) in out.chunks_mut(head_dim).zip(x.chunks(head_dim)) {
        for i in 0..half {
            let n = h[i].hypot(h[i + half]);
            o[i] = n;
            o[i + half] = n;
        }
    }
    out
}

struct RopeBench<T> {
    /// Per set: q, k (rotated in place) and positions.
    sets: Vec<(CudaSlice<T>, CudaSlice<T>, CudaSlice<i32>)>,
    table: RopeTable,
    d: RopeDims,
    variant: &'static str,
}

impl<T: Stored> Bench for RopeBench<T> {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError> {
        let d = self.d;
        let (q, k, pos) = &mut self.sets[set];
        kernels::rope::rope(
            gpu,
            &mut q.slice_mut(0..d.tokens * d.q_heads * d.head_dim),
            &mut k.slice_mut(0..d.tokens * d.kv_heads * d.head_dim),
            &pos.slice(0..d.tokens),
            &self.table,
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
    let mut rng = SmallRng::seed_from_u64(17);
    let d = RopeDims {
        tokens: p.tokens,
        q_heads: p.q_heads,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
    };
    let sets = (0..sets as u64)
        .map(|s| -> Result<_, KernelError> {
            let pos: Vec<i32> = (0..p.tokens)
                .map(|_| rng.random_range(0..p.max_pos) as i32)
                .collect();
            Ok((
                rand_buf::<T>(gpu, p.tokens * p.q_heads * p.head_dim, 2 * s, -1.0, 1.0)?,
                rand_buf(
                    gpu,
                    p.tokens * p.kv_heads * p.head_dim,
                    2 * s + 1,
                    -1.0,
                    1.0,
                )?,
                upload(gpu, &pos)?,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Box::new(RopeBench {
        sets,
        table: RopeTable::new(gpu, p.max_pos, p.head_dim, p.theta)?,
        d,
        variant: static_variant(variant),
    }))
}
