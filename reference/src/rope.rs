//! Rotary position embedding, NeoX style (rotate halves).
//!
//! Shapes: `x` is `[tokens, heads, head_dim]` with `head_dim` even and
//! `>= 2`; `positions` has one non-negative entry per token. Each head vector
//! is split into halves `x1 = x[.., ..d/2]`, `x2 = x[.., d/2..]` and pair
//! `(i, i + d/2)` is rotated by the angle `a = pos * inv_freq[i]`:
//!
//! ```text
//! inv_freq[i]  = theta^(-2i / d)              i in 0..d/2
//! out[i]       = x1[i] * cos(a) - x2[i] * sin(a)
//! out[i + d/2] = x2[i] * cos(a) + x1[i] * sin(a)
//! ```
//!
//! This is HF transformers' `x * cos + rotate_half(x) * sin` (Qwen2, Llama,
//! GPT-NeoX), not the interleaved GPT-J layout that pairs `(2i, 2i + 1)`.
//!
//! Rounding: angles, cosines and sines are all computed in `f64` from the
//! integer position. The GPU side stores [`cos_sin_cache`] in `f32`, so its
//! angles carry an `f32` rounding that grows with the position; comparisons
//! absorb that in their tolerance.

use ndarray::{Array2, Array3, ArrayView3};

use crate::ShapeError;

/// `theta^(-2i / head_dim)` for `i in 0..head_dim / 2`.
///
/// An odd `head_dim` rounds the count down (the last lane has no partner).
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect()
}

/// `[max_positions, head_dim]` table: row `p` is
/// `[cos(p * inv_freq[0..d/2]), sin(p * inv_freq[0..d/2])]`, cosines first.
///
/// For an odd `head_dim` the table is `[max_positions, head_dim - 1]`, one
/// cosine and one sine per entry of [`inv_freq`].
pub fn cos_sin_cache(max_positions: usize, head_dim: usize, theta: f64) -> Array2<f64> {
    let freqs = inv_freq(head_dim, theta);
    let half = freqs.len();
    let mut cache = Array2::zeros((max_positions, 2 * half)); // [max_positions, head_dim]
    for p in 0..max_positions {
        for (i, f) in freqs.iter().enumerate() {
            let a = p as f64 * f;
            cache[[p, i]] = a.cos();
            cache[[p, half + i]] = a.sin();
        }
    }
    cache
}

/// Applies NeoX-style RoPE to `x` `[tokens, heads, head_dim]`, token `t`
/// at position `positions[t]`. Returns `[tokens, heads, head_dim]`.
pub fn rope_neox(
    x: ArrayView3<f64>,
    positions: &[i32],
    theta: f64,
) -> Result<Array3<f64>, ShapeError> {
    const OP: &str = "rope_neox";
    let (tokens, heads, head_dim) = x.dim();
    if head_dim < 2 || head_dim % 2 != 0 {
        return Err(ShapeError::Invalid {
            op: OP,
            arg: "x",
            actual: x.shape().to_vec(),
            requirement: "[tokens, heads, head_dim] with head_dim even and >= 2".into(),
        });
    }
    if positions.len() != tokens {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "positions",
            expected: vec![tokens],
            actual: vec![positions.len()],
        });
    }
    if let Some((t, &p)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
        return Err(ShapeError::OutOfRange {
            op: OP,
            arg: "positions",
            index: vec![t],
            value: i64::from(p),
            expected: "a position >= 0".into(),
        });
    }

    let half = head_dim / 2;
    let freqs = inv_freq(head_dim, theta); // [head_dim / 2]
    let mut out = Array3::zeros((tokens, heads, head_dim)); // [tokens, heads, head_dim]
    for (t, &pos) in positions.iter().enumerate() {
        for (i, f) in freqs.iter().enumerate() {
            let a = f64::from(pos) * f;
            let (sin, cos) = a.sin_cos();
            for h in 0..heads {
                let x1 = x[[t, h, i]];
                let x2 = x[[t, h, half + i]];
                out[[t, h, i]] = x1 * cos - x2 * sin;
                out[[t, h, half + i]] = x2 * cos + x1 * sin;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, close, random, rng};
    use ndarray::{array, s, Array1};
    use proptest::prelude::*;
    use std::f64::consts::{FRAC_PI_2, PI};

    #[test]
    fn inv_freq_hand_values() {
        // theta^(0), theta^(-2/8), theta^(-4/8), theta^(-6/8) with theta = 16
        let f = inv_freq(8, 16.0);
        assert_close(&Array1::from(f), &array![1.0, 0.5, 0.25, 0.125], 1e-15);
        assert_eq!(inv_freq(5, 10.0).len(), 2);
        assert!(inv_freq(0, 10.0).is_empty());
    }

    #[test]
    fn cache_layout_cos_then_sin() {
        let c = cos_sin_cache(3, 4, 16.0); // inv_freq = [1, 0.25]
        assert_eq!(c.dim(), (3, 4));
        assert_close(&c.row(0), &array![1.0, 1.0, 0.0, 0.0], 0.0);
        let (a, b) = (2.0f64, 0.5f64);
        assert_close(
            &c.row(2),
            &array![a.cos(), b.cos(), a.sin(), b.sin()],
            1e-15,
        );
        assert_eq!(cos_sin_cache(2, 5, 10.0).dim(), (2, 4));
    }

    #[test]
    fn position_zero_is_identity() {
        let x = array![[[1.0, 2.0, 3.0, 4.0]]];
        let out = rope_neox(x.view(), &[0], 10000.0).unwrap();
        assert_close(&out, &x, 0.0);
    }

    #[test]
    fn ninety_degrees_by_hand() {
        // head_dim 4: inv_freq = [1, theta^(-1/2)]; theta = 4 / pi^2 makes the
        // second frequency pi/2, so at position 1 pair (1, 3) turns 90 degrees
        // and pair (0, 2) turns 1 radian.
        let theta = 4.0 / (PI * PI);
        approx::assert_relative_eq!(inv_freq(4, theta)[1], FRAC_PI_2, epsilon = 1e-15);
        let x = array![[[1.0, 2.0, 3.0, 4.0]]];
        let out = rope_neox(x.view(), &[1], theta).unwrap();
        let (c, s) = (1f64.cos(), 1f64.sin());
        // pair (1, 3) = (2, 4) -> (-4, 2); pair (0, 2) = (1, 3) rotated by 1 rad
        let expected = array![[[1.0 * c - 3.0 * s, -4.0, 3.0 * c + 1.0 * s, 2.0]]];
        assert_close(&out, &expected, 1e-14);
    }

    #[test]
    fn half_turn_by_hand() {
        // head_dim 4, theta = 1 / pi^2: inv_freq = [1, pi], so position 1
        // turns pair (1, 3) by 180 degrees; pair (0, 2) is zero and stays zero.
        let theta = 1.0 / (PI * PI);
        let x = array![[[0.0, 5.0, 0.0, -7.0], [0.0, 1.0, 0.0, 1.0]]];
        let out = rope_neox(x.view(), &[1], theta).unwrap();
        assert_close(
            &out,
            &array![[[0.0, -5.0, 0.0, 7.0], [0.0, -1.0, 0.0, -1.0]]],
            1e-14,
        );
    }

    #[test]
    fn matches_hf_rotate_half_with_cache() {
        // HF: out = x * [cos, cos] + rotate_half(x) * [sin, sin],
        // rotate_half(x) = [-x2, x1].
        let mut r = rng(7);
        let d = 8;
        let x = random(&mut r, (3, 2, d));
        let positions = [0, 5, 17];
        let cache = cos_sin_cache(32, d, 10000.0);
        let out = rope_neox(x.view(), &positions, 10000.0).unwrap();
        for (t, &p) in positions.iter().enumerate() {
            let cos = cache.slice(s![p as usize, ..d / 2]);
            let sin = cache.slice(s![p as usize, d / 2..]);
            for h in 0..2 {
                let x1 = x.slice(s![t, h, ..d / 2]);
                let x2 = x.slice(s![t, h, d / 2..]);
                let lo = &x1 * &cos - &x2 * &sin;
                let hi = &x2 * &cos + &x1 * &sin;
                assert_close(&out.slice(s![t, h, ..d / 2]), &lo, 1e-15);
                assert_close(&out.slice(s![t, h, d / 2..]), &hi, 1e-15);
            }
        }
    }

    #[test]
    fn errors_name_op_and_arg() {
        let x = Array3::<f64>::zeros((2, 1, 3));
        let msg = rope_neox(x.view(), &[0, 0], 1e4).unwrap_err().to_string();
        assert!(
            msg.starts_with("rope_neox: x has shape [2, 1, 3], expected"),
            "{msg}"
        );

        let x = Array3::<f64>::zeros((2, 1, 0));
        let msg = rope_neox(x.view(), &[0, 0], 1e4).unwrap_err().to_string();
        assert!(msg.starts_with("rope_neox: x has shape [2, 1, 0]"), "{msg}");

        let x = Array3::<f64>::zeros((2, 1, 4));
        let msg = rope_neox(x.view(), &[0], 1e4).unwrap_err().to_string();
        assert_eq!(msg, "rope_neox: positions has shape [1], expected [2]");

        let msg = rope_neox(x.view(), &[3, -1], 1e4).unwrap_err().to_string();
        assert_eq!(
            msg,
            "rope_neox: positions[1] = -1 is out of range, expected a position >= 0"
        );
    }

    /// `[tokens, heads, head_dim]` with `head_dim` even.
    fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
        (1usize..4, 1usize..4, 1usize..9).prop_map(|(t, h, half)| (t, h, 2 * half))
    }

    proptest! {
        #[test]
        fn keeps_pair_norms(
            (t, h, d) in shape(),
            pos in prop::collection::vec(0i32..100_000, 4),
            theta in 2.0f64..1e6,
            seed: u64,
        ) {
            let x = random(&mut rng(seed), (t, h, d));
            let out = rope_neox(x.view(), &pos[..t], theta).unwrap();
            for ti in 0..t {
                for hi in 0..h {
                    for i in 0..d / 2 {
                        let before = x[[ti, hi, i]].hypot(x[[ti, hi, i + d / 2]]);
                        let after = out[[ti, hi, i]].hypot(out[[ti, hi, i + d / 2]]);
                        prop_assert!(approx::abs_diff_eq!(before, after, epsilon = 1e-12));
                    }
                }
            }
        }

        #[test]
        fn position_zero_is_identity_prop((t, h, d) in shape(), theta in 2.0f64..1e6, seed: u64) {
            let x = random(&mut rng(seed), (t, h, d));
            let out = rope_neox(x.view(), &vec![0; t], theta).unwrap();
            prop_assert!(close(&out, &x, 0.0));
        }

        #[test]
        fn dot_depends_only_on_offset(
            half in 1usize..9,
            m in 0i32..5000,
            n in 0i32..5000,
            shift in 0i32..5000,
            theta in 2.0f64..1e6,
            seed: u64,
        ) {
            let d = 2 * half;
            let mut r = rng(seed);
            let q = random(&mut r, (1, 1, d));
            let k = random(&mut r, (1, 1, d));
            let dot = |pq: i32, pk: i32| {
                let q = rope_neox(q.view(), &[pq], theta).unwrap();
                let k = rope_neox(k.view(), &[pk], theta).unwrap();
                (&q * &k).sum()
            };
            let (a, b) = (dot(m, n), dot(m + shift, n + shift));
            // angles up to ~1e4 radians lose ~1e-12 to argument rounding
            prop_assert!(approx::abs_diff_eq!(a, b, epsilon = 1e-9), "{a} vs {b}");
        }
    }
}
