//! Helpers shared by the unit tests: seeded random arrays and element-wise
//! float comparison (the crate does not enable ndarray's `approx` feature).

use ndarray::{Array, ArrayBase, Data, Dimension, ShapeBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// An array of the given shape with entries uniform in `[-1, 1)`.
pub fn random<Sh: ShapeBuilder>(rng: &mut StdRng, shape: Sh) -> Array<f64, Sh::Dim> {
    Array::from_shape_simple_fn(shape, || rng.random_range(-1.0..1.0))
}

/// Same shape and every element within `epsilon` absolutely or
/// `max_relative` relatively (approx's `relative_eq`).
pub fn close<S1, S2, D1, D2>(a: &ArrayBase<S1, D1>, b: &ArrayBase<S2, D2>, epsilon: f64) -> bool
where
    S1: Data<Elem = f64>,
    S2: Data<Elem = f64>,
    D1: Dimension,
    D2: Dimension,
{
    a.shape() == b.shape()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| approx::relative_eq!(*x, *y, epsilon = epsilon, max_relative = epsilon))
}

/// Panics with both arrays printed unless [`close`] holds.
#[track_caller]
pub fn assert_close<S1, S2, D1, D2>(a: &ArrayBase<S1, D1>, b: &ArrayBase<S2, D2>, epsilon: f64)
where
    S1: Data<Elem = f64>,
    S2: Data<Elem = f64>,
    D1: Dimension,
    D2: Dimension,
{
    assert!(
        close(a, b, epsilon),
        "arrays differ (epsilon {epsilon}):\n left: {a}\nright: {b}"
    );
}
