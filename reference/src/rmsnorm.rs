//! RMSNorm and fused residual-add + RMSNorm.
//!
//! Shapes: `x` and `residual` are `[tokens, hidden]`, `weight` is `[hidden]`,
//! with `hidden >= 1` (`tokens` may be 0).
//!
//! ```text
//! rms[t]    = sqrt(mean_i(x[t, i]^2) + eps)
//! out[t, i] = x[t, i] / rms[t] * weight[i]
//! ```
//!
//! Everything is computed in `f64`; the plain [`rmsnorm`] does no rounding.
//!
//! [`fused_add_rmsnorm`] models the one rounding point that changes results
//! visibly between implementations: HF transformers (Qwen2, Llama) adds the
//! residual in the storage dtype (bf16/f16), so the sum is rounded *before*
//! it is normalized and before it is carried to the next layer as the new
//! residual. The caller passes that rounding as `round` (the identity for an
//! exact reference, or a round-to-bf16 function). Later rounding points
//! (casting the normalized value back to the storage dtype before the weight
//! multiply, and the final output cast) are not modelled; comparisons
//! against a GPU kernel absorb them in their tolerance.

use ndarray::{Array2, ArrayView1, ArrayView2, Zip};

use crate::ShapeError;

/// `x / sqrt(mean(x^2) + eps) * weight`, row by row.
///
/// `x`: `[tokens, hidden]`, `weight`: `[hidden]`; returns `[tokens, hidden]`.
pub fn rmsnorm(
    x: ArrayView2<f64>,
    weight: ArrayView1<f64>,
    eps: f64,
) -> Result<Array2<f64>, ShapeError> {
    check("rmsnorm", x, weight)?;
    Ok(normalize(x, weight, eps))
}

/// `new_residual = round(x + residual)`, `out = rmsnorm(new_residual)`.
///
/// `x`, `residual`: `[tokens, hidden]`, `weight`: `[hidden]`. Returns
/// `(out, new_residual)`, both `[tokens, hidden]`. `round` is applied to each
/// element of the sum before normalizing (see the module docs); pass
/// `|v| v` for an unrounded reference.
pub fn fused_add_rmsnorm(
    x: ArrayView2<f64>,
    residual: ArrayView2<f64>,
    weight: ArrayView1<f64>,
    eps: f64,
    round: impl Fn(f64) -> f64,
) -> Result<(Array2<f64>, Array2<f64>), ShapeError> {
    const OP: &str = "fused_add_rmsnorm";
    check(OP, x, weight)?;
    if residual.shape() != x.shape() {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "residual",
            expected: x.shape().to_vec(),
            actual: residual.shape().to_vec(),
        });
    }
    // [tokens, hidden], rounded to the storage dtype as HF does.
    let new_residual = Zip::from(&x)
        .and(&residual)
        .map_collect(|&a, &b| round(a + b));
    let out = normalize(new_residual.view(), weight, eps);
    Ok((out, new_residual))
}

/// Validates `x` `[tokens, hidden]` (hidden >= 1) against `weight` `[hidden]`.
fn check(op: &'static str, x: ArrayView2<f64>, weight: ArrayView1<f64>) -> Result<(), ShapeError> {
    let hidden = x.ncols();
    if hidden == 0 {
        return Err(ShapeError::Invalid {
            op,
            arg: "x",
            actual: x.shape().to_vec(),
            requirement: "[tokens, hidden] with hidden >= 1".into(),
        });
    }
    if weight.len() != hidden {
        return Err(ShapeError::Mismatch {
            op,
            arg: "weight",
            expected: vec![hidden],
            actual: weight.shape().to_vec(),
        });
    }
    Ok(())
}

/// The RMSNorm itself, on already validated shapes.
fn normalize(x: ArrayView2<f64>, weight: ArrayView1<f64>, eps: f64) -> Array2<f64> {
    let (tokens, hidden) = x.dim();
    let mut out = Array2::zeros((tokens, hidden)); // [tokens, hidden]
    for t in 0..tokens {
        let mut sum_sq = 0.0;
        for i in 0..hidden {
            sum_sq += x[[t, i]] * x[[t, i]];
        }
        let rms = (sum_sq / hidden as f64 + eps).sqrt();
        for i in 0..hidden {
            out[[t, i]] = x[[t, i]] / rms * weight[i];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, close, random, rng};
    use ndarray::{array, Array1};
    use proptest::prelude::*;

    #[test]
    fn hand_worked_3_4() {
        // mean(9, 16) = 12.5
        let out = rmsnorm(array![[3.0, 4.0]].view(), array![1.0, 1.0].view(), 0.0).unwrap();
        let r = 12.5f64.sqrt();
        assert_close(&out, &array![[3.0 / r, 4.0 / r]], 1e-15);
    }

    #[test]
    fn hand_worked_weight_and_eps() {
        // mean(1, 1) + 3 = 4, rms = 2
        let out = rmsnorm(array![[1.0, -1.0]].view(), array![2.0, 0.5].view(), 3.0).unwrap();
        assert_close(&out, &array![[1.0, -0.25]], 1e-15);
    }

    #[test]
    fn rows_are_independent() {
        let x = array![[3.0, 4.0], [0.0, 2.0]];
        let out = rmsnorm(x.view(), array![1.0, 1.0].view(), 0.0).unwrap();
        // second row: mean(0, 4) = 2
        let r = 2f64.sqrt();
        assert_close(&out.row(1), &array![0.0, 2.0 / r], 1e-15);
    }

    #[test]
    fn zero_tokens_is_empty() {
        let x = Array2::<f64>::zeros((0, 4));
        let out = rmsnorm(x.view(), Array1::ones(4).view(), 1e-6).unwrap();
        assert_eq!(out.dim(), (0, 4));
    }

    #[test]
    fn fused_rounds_before_normalizing() {
        // x + residual = [2.4, 0.6]; rounded to integers: [2, 1], mean(4, 1) = 2.5
        let (out, res) = fused_add_rmsnorm(
            array![[2.0, 0.5]].view(),
            array![[0.4, 0.1]].view(),
            array![1.0, 1.0].view(),
            0.0,
            f64::round,
        )
        .unwrap();
        assert_close(&res, &array![[2.0, 1.0]], 0.0);
        let r = 2.5f64.sqrt();
        assert_close(&out, &array![[2.0 / r, 1.0 / r]], 1e-15);
    }

    #[test]
    fn weight_mismatch_message() {
        let x = Array2::<f64>::zeros((2, 896));
        let err = rmsnorm(x.view(), Array1::zeros(895).view(), 1e-6).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rmsnorm: weight has shape [895], expected [896]"
        );
    }

    #[test]
    fn zero_hidden_is_error() {
        let x = Array2::<f64>::zeros((2, 0));
        let err = rmsnorm(x.view(), Array1::zeros(0).view(), 1e-6).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("rmsnorm: x has shape [2, 0]"), "{msg}");
    }

    #[test]
    fn fused_errors_name_op_and_arg() {
        let x = Array2::<f64>::zeros((2, 4));
        let w = Array1::<f64>::zeros(4);
        let err = fused_add_rmsnorm(x.view(), Array2::zeros((3, 4)).view(), w.view(), 0.0, |v| v)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "fused_add_rmsnorm: residual has shape [3, 4], expected [2, 4]"
        );
        let err =
            fused_add_rmsnorm(x.view(), x.view(), Array1::zeros(5).view(), 0.0, |v| v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "fused_add_rmsnorm: weight has shape [5], expected [4]"
        );
        let z = Array2::<f64>::zeros((2, 0));
        let err =
            fused_add_rmsnorm(z.view(), z.view(), Array1::zeros(0).view(), 0.0, |v| v).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("fused_add_rmsnorm: x has shape"));
    }

    proptest! {
        #[test]
        fn scale_invariant(tokens in 1usize..5, hidden in 1usize..40, c in 0.01f64..100.0, seed: u64) {
            let mut r = rng(seed);
            let x = random(&mut r, (tokens, hidden));
            let w = random(&mut r, hidden);
            let a = rmsnorm(x.view(), w.view(), 0.0).unwrap();
            let b = rmsnorm((&x * c).view(), w.view(), 0.0).unwrap();
            prop_assert!(close(&a, &b, 1e-12), "{a} vs {b}");
        }

        #[test]
        fn fused_identity_equals_rmsnorm_of_sum(
            tokens in 0usize..5, hidden in 1usize..40, eps in 0.0f64..1e-3, seed: u64
        ) {
            let mut r = rng(seed);
            let x = random(&mut r, (tokens, hidden));
            let res = random(&mut r, (tokens, hidden));
            let w = random(&mut r, hidden);
            let (out, new_res) = fused_add_rmsnorm(x.view(), res.view(), w.view(), eps, |v| v).unwrap();
            let sum = &x + &res;
            prop_assert!(close(&new_res, &sum, 0.0));
            let expected = rmsnorm(sum.view(), w.view(), eps).unwrap();
            prop_assert!(close(&out, &expected, 0.0));
        }

        #[test]
        fn unit_weight_rows_have_unit_rms(tokens in 1usize..5, hidden in 1usize..40, seed: u64) {
            let mut r = rng(seed);
            let x = random(&mut r, (tokens, hidden));
            let out = rmsnorm(x.view(), Array1::ones(hidden).view(), 0.0).unwrap();
            for row in out.rows() {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
                prop_assert!(approx::abs_diff_eq!(ms, 1.0, epsilon = 1e-12));
            }
        }
    }
}
