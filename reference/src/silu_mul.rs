//! SwiGLU activation: `silu(gate) * up`.
//!
//! Shapes: `input` is `[tokens, 2 * I]`, laid out `gate | up` along the last
//! dimension (`gate = input[:, ..I]`, `up = input[:, I..]`, as in vLLM's
//! `SiluAndMul` after the merged gate/up projection); the output is
//! `[tokens, I]`:
//!
//! ```text
//! out[t, i] = silu(input[t, i]) * input[t, I + i]
//! silu(g)   = g * sigmoid(g) = g / (1 + exp(-g))
//! ```
//!
//! All in `f64`, no rounding. [`silu`] is evaluated in a form that cannot
//! overflow into `inf / inf` or `inf * 0`: for negative `g` it uses
//! `g * e / (1 + e)` with `e = exp(g) <= 1`, so `silu(-1e4)` is `-0.0`
//! rather than NaN, and `silu(-inf)` is `-0.0` too.

use ndarray::{Array2, ArrayView2};

use crate::ShapeError;

/// `g / (1 + exp(-g))`, computed without overflow for any `g`.
pub fn silu(g: f64) -> f64 {
    if g >= 0.0 {
        // exp(-g) <= 1: no overflow.
        g / (1.0 + (-g).exp())
    } else if g == f64::NEG_INFINITY {
        // The limit of g * sigmoid(g); the formula below would give -inf * 0.
        -0.0
    } else {
        // e = exp(g) < 1: no overflow; for very negative g, e underflows to 0.
        // NaN input falls through to here and stays NaN.
        let e = g.exp();
        g * e / (1.0 + e)
    }
}

/// `silu(gate) * up` for `input = [gate | up]`.
///
/// `input`: `[tokens, 2 * I]`; returns `[tokens, I]`. An odd last dimension
/// is an error.
pub fn silu_mul(input: ArrayView2<f64>) -> Result<Array2<f64>, ShapeError> {
    let (tokens, width) = input.dim();
    if width % 2 != 0 {
        return Err(ShapeError::Invalid {
            op: "silu_mul",
            arg: "input",
            actual: input.shape().to_vec(),
            requirement: "[tokens, 2 * intermediate] (an even last dimension, gate | up)".into(),
        });
    }
    let inter = width / 2;
    let mut out = Array2::zeros((tokens, inter)); // [tokens, I]
    for t in 0..tokens {
        for i in 0..inter {
            out[[t, i]] = silu(input[[t, i]]) * input[[t, inter + i]];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, close, random, rng};
    use ndarray::{array, s};
    use proptest::prelude::*;

    #[test]
    fn silu_hand_values() {
        assert_eq!(silu(0.0), 0.0);
        approx::assert_relative_eq!(silu(1.0), 1.0 / (1.0 + (-1.0f64).exp()), epsilon = 1e-16);
        // sigmoid(-1) = 1 - sigmoid(1), so silu(-1) = -(1 - sigmoid(1))
        approx::assert_relative_eq!(silu(-1.0), -1.0 / (1.0 + 1.0f64.exp()), epsilon = 1e-16);
    }

    #[test]
    fn silu_extremes() {
        let v = silu(-1e4);
        assert!(v == 0.0 && !v.is_nan(), "{v}");
        assert!(v.is_sign_negative());
        assert_eq!(silu(-1000.0), -0.0);
        assert_eq!(silu(f64::NEG_INFINITY), 0.0);
        assert_eq!(silu(1e4), 1e4);
        assert_eq!(silu(f64::INFINITY), f64::INFINITY);
        assert!(silu(f64::NAN).is_nan());
    }

    #[test]
    fn hand_worked_rows() {
        // gate | up
        let input = array![[0.0, 1.0, 5.0, 3.0], [-1e4, 2.0, 7.0, -2.0]];
        let out = silu_mul(input.view()).unwrap();
        let s1 = 1.0 / (1.0 + (-1.0f64).exp());
        let s2 = 2.0 / (1.0 + (-2.0f64).exp());
        assert_close(&out, &array![[0.0, 3.0 * s1], [0.0, -2.0 * s2]], 1e-15);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn empty_shapes() {
        assert_eq!(
            silu_mul(Array2::zeros((0, 6)).view()).unwrap().dim(),
            (0, 3)
        );
        assert_eq!(
            silu_mul(Array2::zeros((3, 0)).view()).unwrap().dim(),
            (3, 0)
        );
    }

    #[test]
    fn odd_width_is_error() {
        let err = silu_mul(Array2::zeros((2, 7)).view()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("silu_mul: input has shape [2, 7], expected"),
            "{msg}"
        );
    }

    proptest! {
        #[test]
        fn matches_halves(tokens in 0usize..6, inter in 0usize..20, seed: u64) {
            let mut r = rng(seed);
            let input = random(&mut r, (tokens, 2 * inter)) * 20.0;
            let out = silu_mul(input.view()).unwrap();
            let gate = input.slice(s![.., ..inter]);
            let up = input.slice(s![.., inter..]);
            let expected = gate.mapv(|g| g / (1.0 + (-g).exp())) * up;
            prop_assert!(close(&out, &expected, 1e-14));
        }

        #[test]
        fn silu_is_finite_and_bounded_below(g in -1e300f64..1e300) {
            let v = silu(g);
            prop_assert!(!v.is_nan());
            // min of silu is about -0.2785
            prop_assert!(v >= -0.2785, "{g} -> {v}");
        }
    }
}
