//! Shapes shared by the kernels' case lists: the edge sizes that find bugs and
//! the real Qwen2 dimensions (see ../shared/DESIGN.md).

use crate::case::Case;
use ndarray::{ArrayView2, ArrayView3, ArrayView4};
use rand::rngs::SmallRng;
use rand::Rng;

/// Row lengths around warp, vector and block boundaries.
pub const ODD_ROWS: &[usize] = &[1, 7, 33, 769, 1023, 1024, 1025];
/// Qwen2 hidden sizes: 0.5B, 1.5B, 7B, 72B.
pub const HIDDEN: &[usize] = &[896, 1536, 3584, 8192];
/// Token counts for check cases: one, odd, not a multiple of anything.
pub const TOKENS_CHECK: [usize; 3] = [1, 7, 83];
/// Perf token counts: decode batches, then prefill chunks.
pub const PERF_TOKENS: &[usize] = &[1, 8, 64, 256, 4096, 16384, 65536];

#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub name: &'static str,
    pub hidden: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
}

pub const QWEN2: &[Model] = &[
    Model {
        name: "qwen2-0.5b",
        hidden: 896,
        q_heads: 14,
        kv_heads: 2,
        head_dim: 64,
        intermediate: 4864,
    },
    Model {
        name: "qwen2-1.5b",
        hidden: 1536,
        q_heads: 12,
        kv_heads: 2,
        head_dim: 128,
        intermediate: 8960,
    },
    Model {
        name: "qwen2-7b",
        hidden: 3584,
        q_heads: 28,
        kv_heads: 4,
        head_dim: 128,
        intermediate: 18944,
    },
    Model {
        name: "qwen2-72b",
        hidden: 8192,
        q_heads: 64,
        kv_heads: 8,
        head_dim: 128,
        intermediate: 29568,
    },
];

/// One perf case per Qwen2 model and perf token count.
pub fn models_by_tokens(f: impl Fn(&Model, usize) -> Case) -> Vec<Case> {
    QWEN2
        .iter()
        .flat_map(|m| PERF_TOKENS.iter().map(move |&t| (m, t)))
        .map(|(m, t)| f(m, t))
        .collect()
}

/// A row length for random cases: an edge size, a real size, or anything up to 2048.
pub fn random_row(rng: &mut SmallRng) -> usize {
    match rng.random_range(0..3) {
        0 => ODD_ROWS[rng.random_range(0..ODD_ROWS.len())],
        1 => HIDDEN[rng.random_range(0..HIDDEN.len())],
        _ => rng.random_range(1..=2048),
    }
}

// Views over flat buffers whose lengths the caller built from the same
// dimensions; a mismatch is a bug in this crate, not a user error.
const BY_CONSTRUCTION: &str = "buffer length equals the product of its dimensions by construction";

pub fn view2(v: &[f64], d: (usize, usize)) -> ArrayView2<'_, f64> {
    ArrayView2::from_shape(d, v).expect(BY_CONSTRUCTION)
}

pub fn view3(v: &[f64], d: (usize, usize, usize)) -> ArrayView3<'_, f64> {
    ArrayView3::from_shape(d, v).expect(BY_CONSTRUCTION)
}

pub fn view4(v: &[f64], d: (usize, usize, usize, usize)) -> ArrayView4<'_, f64> {
    ArrayView4::from_shape(d, v).expect(BY_CONSTRUCTION)
}

/// Flatten a reference result to row-major order.
pub fn flat<D: ndarray::Dimension>(a: ndarray::Array<f64, D>) -> Vec<f64> {
    if a.is_standard_layout() {
        a.into_raw_vec_and_offset().0
    } else {
        a.iter().copied().collect()
    }
}
