//! Shared by the kernels crate's GPU test files: a seeded generator, the
//! tolerances of an output rounded once, and the f64 GEMM reference.
#![allow(dead_code)] // each test file uses its own subset

use kernels::{DType, Storage};

/// SplitMix64: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), never exactly 0.
    pub fn uniform(&mut self) -> f64 {
        let u = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        2.0 * u - 1.0
    }

    pub fn values<T: Storage>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f64(self.uniform())).collect()
    }
}

pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
    pub rel_l2: f64,
}

/// `workbench::op::rounded_once`, which this crate cannot depend on.
pub fn rounded_once(d: DType) -> Tol {
    match d {
        DType::BF16 => Tol {
            atol: 1e-2,
            rtol: 1e-2,
            rel_l2: 5e-3,
        },
        DType::F16 => Tol {
            atol: 1e-3,
            rtol: 2e-3,
            rel_l2: 1e-3,
        },
        DType::F32 => Tol {
            atol: 1e-5,
            rtol: 1e-5,
            rel_l2: 1e-5,
        },
    }
}

/// f32 accumulation error, relative to Σ|x·w|.
pub const ACC_RTOL: f64 = 1e-5;

/// (y [tokens, out], Σ|x·w| [tokens, out]) in f64, threads over tokens.
pub fn reference<T: Storage>(
    x: &[T],
    w: &[T],
    tokens: usize,
    inf: usize,
    out: usize,
) -> (Vec<f64>, Vec<f64>) {
    let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
    let mut y = vec![0.0; tokens * out];
    let mut s = vec![0.0; tokens * out];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let rows = tokens.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        for ((yc, sch), xc) in y
            .chunks_mut(rows * out)
            .zip(s.chunks_mut(rows * out))
            .zip(xf.chunks(rows * inf))
        {
            let wf = &wf;
            sc.spawn(move || {
                for ((yr, sr), xr) in yc
                    .chunks_mut(out)
                    .zip(sch.chunks_mut(out))
                    .zip(xc.chunks(inf))
                {
                    for ((yo, so), wr) in yr.iter_mut().zip(sr.iter_mut()).zip(wf.chunks(inf)) {
                        let (mut acc, mut mag) = (0.0f64, 0.0f64);
                        for (a, b) in xr.iter().zip(wr) {
                            let p = a * b;
                            acc += p;
                            mag += p.abs();
                        }
                        *yo = acc;
                        *so = mag;
                    }
                }
            });
        }
    });
    (y, s)
}
