//! Seeded input generators: the value regimes every check case draws from.
//!
//! Values are drawn in f64, then rounded to the storage type, and the CPU
//! reference is fed the rounded values, so the comparison measures the
//! kernel's arithmetic, not the input quantization. Never zeros alone: zeros
//! hide unwritten outputs and wrong indexing.

use crate::case::{Case, CaseError};
use kernels::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gen {
    /// Standard normal.
    Randn,
    /// Uniform in [-1, 1).
    Uniform,
    /// All ones.
    Ones,
    /// ((i mod 64) - 32) / 8: a deterministic ramp, exact in every dtype.
    Arange,
    /// Magnitudes in [0.5, 1] x the op's large scale (e.g. bf16 residuals near 3e4),
    /// random signs.
    Large,
    /// Randn with the first row all zeros.
    ZeroRow,
}

impl Gen {
    pub const ALL: [Gen; 6] = [
        Gen::Randn,
        Gen::Uniform,
        Gen::Ones,
        Gen::Arange,
        Gen::Large,
        Gen::ZeroRow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Gen::Randn => "randn",
            Gen::Uniform => "uniform",
            Gen::Ones => "ones",
            Gen::Arange => "arange",
            Gen::Large => "large",
            Gen::ZeroRow => "zero_row",
        }
    }

    /// `n` values laid out in rows of `row` (for ZeroRow); `large` is the
    /// op's scale for the Large regime. Drawn in parallel chunks, each seeded
    /// from one draw of `rng` and its chunk index, so the values depend on the
    /// seed alone, not on the thread count.
    pub fn fill(self, rng: &mut SmallRng, n: usize, row: usize, large: f64) -> Vec<f64> {
        let base: u64 = rng.random();
        let mut v = vec![0.0; n];
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let mut r =
                SmallRng::seed_from_u64(base ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let start = c * CHUNK;
            for (i, x) in out.iter_mut().enumerate() {
                *x = self.draw(&mut r, start + i, large);
            }
        });
        if self == Gen::ZeroRow {
            v.iter_mut().take(row.min(n)).for_each(|x| *x = 0.0);
        }
        v
    }

    fn draw(self, r: &mut SmallRng, i: usize, large: f64) -> f64 {
        match self {
            Gen::Randn | Gen::ZeroRow => StandardNormal.sample(r),
            Gen::Uniform => r.random_range(-1.0..1.0),
            Gen::Ones => 1.0,
            Gen::Arange => ((i % 64) as f64 - 32.0) / 8.0,
            Gen::Large => {
                let m = r.random_range(0.5..1.0) * large;
                if r.random::<bool>() {
                    m
                } else {
                    -m
                }
            }
        }
    }
}

/// Elements per generator chunk.
const CHUNK: usize = 1 << 16;

impl fmt::Display for Gen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Gen {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Gen::ALL.into_iter().find(|g| g.name() == s).ok_or(())
    }
}

/// The generator and RNG a case asks for (`gen=`, default randn; `seed=`, default 0).
pub fn from_case(case: &Case) -> Result<(Gen, SmallRng), CaseError> {
    let gen = case.parse_or(
        "gen",
        Gen::Randn,
        "one of randn, uniform, ones, arange, large, zero_row",
    )?;
    let seed: u64 = case.parse_or("seed", 0, "an unsigned integer")?;
    Ok((gen, SmallRng::seed_from_u64(seed)))
}

/// Round every value to what `dtype` stores.
pub fn round_all(v: &mut [f64], dtype: DType) {
    v.par_iter_mut().for_each(|x| *x = dtype.round(*x));
}

/// `n` weights near 1 (RMSNorm weights are trained around 1), rounded to dtype.
pub fn weights(rng: &mut SmallRng, n: usize, dtype: DType) -> Vec<f64> {
    (0..n)
        .map(|_| dtype.round(rng.random_range(0.5..1.5)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regimes_are_seeded_and_distinct() {
        let mut a = SmallRng::seed_from_u64(1);
        let mut b = SmallRng::seed_from_u64(1);
        assert_eq!(
            Gen::Randn.fill(&mut a, 10, 5, 1.0),
            Gen::Randn.fill(&mut b, 10, 5, 1.0)
        );
        let z = Gen::ZeroRow.fill(&mut a, 10, 5, 1.0);
        assert!(z[..5].iter().all(|&x| x == 0.0) && z[5..].iter().any(|&x| x != 0.0));
        let l = Gen::Large.fill(&mut a, 100, 10, 3e4);
        assert!(l.iter().all(|x| x.abs() >= 1.5e4 && x.abs() <= 3e4));
        assert!(Gen::Arange
            .fill(&mut a, 64, 64, 1.0)
            .iter()
            .all(|x| x.abs() <= 4.0));
        for g in Gen::ALL {
            assert_eq!(g.name().parse::<Gen>(), Ok(g));
        }
    }
}
