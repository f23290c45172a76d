//! Tests for [`super`]: hand-worked values, invariants, and error messages.

use super::*;
use crate::testutil::{assert_close, close, random, rng};
use ndarray::{array, Array1, Array4, Axis};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::Rng;

#[test]
fn softmax_by_hand() {
    // exp(0) : exp(ln 3) = 1 : 3
    let p = softmax(&[0.0, 3f64.ln()]);
    assert_close(&Array1::from(p), &array![0.25, 0.75], 1e-15);
    assert!(softmax(&[]).is_empty());
    // max-subtraction keeps large scores finite
    assert_eq!(softmax(&[1000.0, 1000.0]), vec![0.5, 0.5]);
    assert_eq!(softmax(&[-5.0]), vec![1.0]);
}

#[test]
fn two_token_attention_by_hand() {
    // scores = ln3 * [q.k0, q.k1] = [ln 3, 0] -> p = [3/4, 1/4]
    let q = array![[1.0, 0.0]];
    let k = array![[[1.0, 0.0]], [[0.0, 1.0]]];
    let v = array![[[4.0, 0.0]], [[0.0, 8.0]]];
    let out = contiguous_decode(q.view(), k.view(), v.view(), 3f64.ln()).unwrap();
    assert_close(&out, &array![[3.0, 2.0]], 1e-14);
}

#[test]
fn gqa_by_hand() {
    // 2 query heads share 1 kv head; head 0 looks at token 0, head 1 at token 1
    // with scale 1e3 the softmax is one-hot to ~exp(-1000)
    let q = array![[1.0, 0.0], [0.0, 1.0]];
    let k = array![[[1.0, 0.0]], [[0.0, 1.0]]];
    let v = array![[[5.0, 6.0]], [[7.0, 8.0]]];
    let out = contiguous_decode(q.view(), k.view(), v.view(), 1e3).unwrap();
    assert_close(&out, &array![[5.0, 6.0], [7.0, 8.0]], 1e-12);
}

#[test]
fn empty_context_gives_zeros() {
    let q = array![[1.0, 2.0], [3.0, 4.0]];
    let kv = Array3::<f64>::zeros((0, 1, 2));
    let out = contiguous_decode(q.view(), kv.view(), kv.view(), 1.0).unwrap();
    assert_eq!(out, Array2::<f64>::zeros((2, 2)));

    let cache = Array4::from_elem((1, 4, 1, 2), f64::NAN);
    let out = paged_decode(
        q.view().insert_axis(Axis(0)),
        cache.view(),
        cache.view(),
        array![[-1]].view(),
        &[0],
        1.0,
    )
    .unwrap();
    assert_eq!(out, Array3::<f64>::zeros((1, 2, 2)));
}

#[test]
fn paged_by_hand() {
    // block_size 2; the sequence's 3 tokens live in block 2 (tokens 0, 1) and
    // block 0 (token 2); everything else is NaN. block_tables[0, 2] = 99 is
    // past the live blocks and never looked at.
    let mut kc = Array4::from_elem((3, 2, 1, 2), f64::NAN);
    let mut vc = kc.clone();
    let k = array![[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]];
    let v = array![[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]];
    for (j, (block, offset)) in [(2, 0), (2, 1), (0, 0)].into_iter().enumerate() {
        kc.slice_mut(s![block, offset, .., ..])
            .assign(&k.slice(s![j, .., ..]));
        vc.slice_mut(s![block, offset, .., ..])
            .assign(&v.slice(s![j, .., ..]));
    }
    let q = array![[[0.5, -0.25]]];
    let out = paged_decode(
        q.view(),
        kc.view(),
        vc.view(),
        array![[2, 0, 99]].view(),
        &[3],
        0.7,
    )
    .unwrap();
    let expected = contiguous_decode(q.slice(s![0, .., ..]), k.view(), v.view(), 0.7).unwrap();
    assert_close(&out.slice(s![0, .., ..]), &expected, 0.0);
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn contiguous_errors_name_op_and_arg() {
    let q = Array2::<f64>::zeros((4, 8));
    let kv = Array3::<f64>::zeros((5, 2, 8));
    let err = |q: &Array2<f64>, k: &Array3<f64>, v: &Array3<f64>| {
        contiguous_decode(q.view(), k.view(), v.view(), 1.0)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&q, &Array3::zeros((5, 2, 7)), &kv),
        "contiguous_decode: k has shape [5, 2, 7], expected [5, 2, 8]"
    );
    assert_eq!(
        err(&q, &kv, &Array3::zeros((4, 2, 8))),
        "contiguous_decode: v has shape [4, 2, 8], expected [5, 2, 8]"
    );
    assert_eq!(
        err(&Array2::zeros((3, 8)), &kv, &kv),
        "contiguous_decode: k has shape [5, 2, 8], expected kv_heads >= 1 dividing q_heads (3)"
    );
    let none = Array3::<f64>::zeros((5, 0, 8));
    assert!(err(&q, &none, &none).starts_with("contiguous_decode: k has shape [5, 0, 8]"));
}

/// A valid paged problem to break one argument at a time: batch 2, 4 query
/// heads, 2 kv heads, head_dim 8, 3 blocks of 4 slots, 2 blocks per sequence.
struct Paged {
    q: Array3<f64>,
    cache: Array4<f64>,
    tables: Array2<i32>,
    lens: Vec<i32>,
}

impl Paged {
    fn new() -> Self {
        Self {
            q: Array3::zeros((2, 4, 8)),
            cache: Array4::zeros((3, 4, 2, 8)),
            tables: array![[0, 1], [2, -1]],
            lens: vec![6, 3],
        }
    }

    fn run(&self, v_cache: Option<&Array4<f64>>) -> Result<Array3<f64>, ShapeError> {
        let v = v_cache.unwrap_or(&self.cache);
        paged_decode(
            self.q.view(),
            self.cache.view(),
            v.view(),
            self.tables.view(),
            &self.lens,
            1.0,
        )
    }

    fn err(&self) -> String {
        self.run(None).unwrap_err().to_string()
    }
}

#[test]
fn paged_valid_baseline_runs() {
    // the -1 padding in block_tables[1, 1] is past the live blocks
    assert!(Paged::new().run(None).is_ok());
}

#[test]
fn paged_shape_errors_name_op_and_arg() {
    let mut p = Paged::new();
    p.cache = Array4::zeros((3, 4, 2, 7));
    assert_eq!(
        p.err(),
        "paged_decode: k_cache has shape [3, 4, 2, 7], expected [3, 4, 2, 8]"
    );

    let p = Paged::new();
    let msg = p
        .run(Some(&Array4::zeros((3, 2, 2, 8))))
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "paged_decode: v_cache has shape [3, 2, 2, 8], expected [3, 4, 2, 8]"
    );

    let mut p = Paged::new();
    p.cache = Array4::zeros((3, 4, 3, 8));
    assert!(p
        .err()
        .starts_with("paged_decode: k_cache has shape [3, 4, 3, 8], expected kv_heads"));

    let mut p = Paged::new();
    p.tables = array![[0, 1]];
    assert_eq!(
        p.err(),
        "paged_decode: block_tables has shape [1, 2], expected [2, 2]"
    );

    let mut p = Paged::new();
    p.lens = vec![1];
    assert_eq!(
        p.err(),
        "paged_decode: context_lens has shape [1], expected [2]"
    );
}

#[test]
fn paged_range_errors_name_op_and_arg() {
    let mut p = Paged::new();
    p.lens = vec![6, -1];
    assert!(p.err().starts_with(
        "paged_decode: context_lens[1] = -1 is out of range, expected a length in [0, 8]"
    ));

    let mut p = Paged::new();
    p.lens = vec![9, 0];
    assert!(p
        .err()
        .starts_with("paged_decode: context_lens[0] = 9 is out of range"));

    let mut p = Paged::new();
    p.tables = array![[0, 3], [2, -1]];
    assert_eq!(
        p.err(),
        "paged_decode: block_tables[0, 1] = 3 is out of range, expected a block id in [0, 3)"
    );

    let mut p = Paged::new();
    p.lens = vec![6, 5]; // now block_tables[1, 1] = -1 holds live tokens
    assert_eq!(
        p.err(),
        "paged_decode: block_tables[1, 1] = -1 is out of range, expected a block id in [0, 3)"
    );
}

/// `(q_heads, kv_heads, head_dim)` with `q_heads % kv_heads == 0`.
fn heads() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..4, 1usize..4, 1usize..9).prop_map(|(kv, group, d)| (kv * group, kv, d))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn softmax_is_a_distribution(scores in prop::collection::vec(-50.0f64..50.0, 1..40)) {
        let p = softmax(&scores);
        prop_assert_eq!(p.len(), scores.len());
        prop_assert!(p.iter().all(|&x| x >= 0.0));
        prop_assert!(approx::abs_diff_eq!(p.iter().sum::<f64>(), 1.0, epsilon = 1e-12));
    }

    #[test]
    fn equal_v_rows_give_that_row(
        (qh, kvh, d) in heads(), context in 1usize..10, scale in 0.01f64..3.0, seed: u64
    ) {
        let mut r = rng(seed);
        let q = random(&mut r, (qh, d));
        let k = random(&mut r, (context, kvh, d));
        let row = random(&mut r, (kvh, d)); // one value row per kv head
        let v = row.broadcast((context, kvh, d)).unwrap().to_owned();
        let out = contiguous_decode(q.view(), k.view(), v.view(), scale).unwrap();
        for h in 0..qh {
            let kv = h / (qh / kvh);
            prop_assert!(close(&out.row(h), &row.row(kv), 1e-12));
        }
    }

    #[test]
    fn gqa_equals_each_head_alone(
        (qh, kvh, d) in heads(), context in 0usize..10, scale in 0.01f64..3.0, seed: u64
    ) {
        let mut r = rng(seed);
        let q = random(&mut r, (qh, d));
        let k = random(&mut r, (context, kvh, d));
        let v = random(&mut r, (context, kvh, d));
        let out = contiguous_decode(q.view(), k.view(), v.view(), scale).unwrap();
        let group = qh / kvh;
        for h in 0..qh {
            // MHA with a single head: q [1, d], k/v [context, 1, d]
            let kv = h / group;
            let alone = contiguous_decode(
                q.slice(s![h..h + 1, ..]),
                k.slice(s![.., kv..kv + 1, ..]),
                v.slice(s![.., kv..kv + 1, ..]),
                scale,
            ).unwrap();
            prop_assert!(close(&out.row(h), &alone.row(0), 0.0));
        }
    }

    #[test]
    fn paged_equals_contiguous_under_any_block_permutation(
        (qh, kvh, d) in heads(),
        block_size in 1usize..5,
        lens in prop::collection::vec(0usize..12, 1..4),
        spare_blocks in 0usize..4,
        spare_columns in 0usize..2,
        seed: u64,
    ) {
        let mut r = rng(seed);
        let batch = lens.len();
        let blocks_of: Vec<usize> = lens.iter().map(|l| l.div_ceil(block_size)).collect();
        let max_blocks = blocks_of.iter().max().copied().unwrap_or(0) + spare_columns;
        let num_blocks = blocks_of.iter().sum::<usize>() + spare_blocks;
        // a random permutation of the pool, handed out in order
        let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
        pool.shuffle(&mut r);
        let mut pool = pool.into_iter();
        // entries past the live blocks are garbage: -1 or an unused id
        let mut tables = Array2::from_shape_simple_fn((batch, max_blocks), || {
            if r.random_bool(0.5) { -1 } else { 1_000_000 }
        });
        for (b, &n) in blocks_of.iter().enumerate() {
            for i in 0..n {
                tables[[b, i]] = pool.next().unwrap_or(-1);
            }
        }

        let shape = (num_blocks, block_size, kvh, d);
        let mut kc = Array4::from_elem(shape, f64::NAN);
        let mut vc = Array4::from_elem(shape, f64::NAN);
        let q = random(&mut r, (batch, qh, d));
        let scale = 1.0 / (d as f64).sqrt();
        let mut expected = Array3::zeros((batch, qh, d));
        for (b, &len) in lens.iter().enumerate() {
            let k = random(&mut r, (len, kvh, d));
            let v = random(&mut r, (len, kvh, d));
            for j in 0..len {
                let (block, offset) = (tables[[b, j / block_size]] as usize, j % block_size);
                kc.slice_mut(s![block, offset, .., ..]).assign(&k.slice(s![j, .., ..]));
                vc.slice_mut(s![block, offset, .., ..]).assign(&v.slice(s![j, .., ..]));
            }
            let o = contiguous_decode(q.slice(s![b, .., ..]), k.view(), v.view(), scale).unwrap();
            expected.slice_mut(s![b, .., ..]).assign(&o);
        }
        let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let out = paged_decode(q.view(), kc.view(), vc.view(), tables.view(), &lens_i32, scale)
            .unwrap();
        prop_assert!(out.iter().all(|x| !x.is_nan()));
        prop_assert!(close(&out, &expected, 0.0));
    }
}
