//! `qkv_rope_kv_store` (kernels/cuda/rope_kv_store.cu), the engine's path
//! from its fused q|k|v projection, must be bit-identical to the two kernels
//! it replaces: `split_qkv_bias` then `rope_kv_store` (itself checked against
//! the f64 CPU reference by `workbench check rope_kv_store` and the GPU
//! proptests), and every variant of either must be bit-identical to v1's
//! split path. Fresh random inputs, caches pre-filled with NaN-free noise,
//! slots that skip (-1) and positions out of the table's range (NaN rows).

use half::{bf16, f16};
use kernels::rope::RopeTable;
use kernels::rope_kv_store::{RopeKvStoreArgs, RopeKvStoreDims};
use kernels::{Gpu, Storage};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod common;

/// (tokens, q_heads, kv_heads, head_dim): Qwen2-0.5B and -1.5B heads at a
/// decode batch and a prefill chunk, head_dim 80 (vector path, odd chunk
/// count) and 6 (half of 3: the scalar path).
const SHAPES: [(usize, usize, usize, usize); 5] = [
    (256, 14, 2, 64),
    (37, 12, 2, 128),
    (5, 4, 1, 80),
    (9, 3, 1, 6),
    (1, 28, 4, 128),
];
const BLOCK: usize = 16;
const MAX_POS: usize = 512;

fn bits<T: Storage>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn run<T: Storage>(gpu: &Gpu, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let s = gpu.stream();
    for &(t, qh, kvh, d) in &SHAPES {
        let (qd, kd) = (qh * d, kvh * d);
        let row = qd + 2 * kd;
        let num_blocks = (t + BLOCK) / BLOCK * 3;
        let cache_len = num_blocks * BLOCK * kd;
        let mut rnd = |n: usize, scale: f64| -> Vec<T> {
            (0..n)
                .map(|_| T::from_f64(rng.random_range(-scale..scale)))
                .collect()
        };
        let qkv = rnd(t * row, 2.0);
        let bias = rnd(row, 0.5);
        let cache0 = rnd(cache_len, 1.0);
        let mut positions: Vec<i32> = (0..t).map(|i| ((i * 37) % MAX_POS) as i32).collect();
        let mut slots: Vec<i64> = (0..t).map(|i| (i * 3 + 1) as i64).collect();
        if t > 2 {
            slots[1] = -1; // not stored; q still rotated
            positions[2] = MAX_POS as i32 + 5; // out of the table: NaN q and k
        }
        let table = RopeTable::new(gpu, MAX_POS, d, 1e6).unwrap();
        let dims = RopeKvStoreDims {
            tokens: t,
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
            block_size: BLOCK,
            num_blocks,
        };
        let (qkv_d, bias_d) = (s.clone_htod(&qkv).unwrap(), s.clone_htod(&bias).unwrap());
        let pos_d = s.clone_htod(&positions).unwrap();
        let slot_d = s.clone_htod(&slots).unwrap();

        // Fused, from the q|k|v projection: (q_out, k_cache, v_cache).
        let fused = |variant: &str| {
            common::qkv_rope_kv_store_fresh(
                gpu, &qkv_d, &bias_d, &cache0, &pos_d, &slot_d, &table, dims, variant,
            )
            .map(|b| s.clone_dtoh(&b).unwrap())
        };

        // Split, then rope_kv_store.
        let split = |variant: &str| {
            let mut q2 = s.alloc_zeros::<T>(t * qd).unwrap();
            let mut k = s.alloc_zeros::<T>(t * kd).unwrap();
            let mut v = s.alloc_zeros::<T>(t * kd).unwrap();
            kernels::util::split_qkv_bias(
                gpu,
                &mut q2.slice_mut(..),
                &mut k.slice_mut(..),
                &mut v.slice_mut(..),
                &qkv_d.slice(..),
                &bias_d.slice(..),
                t,
                qd,
                kd,
            )
            .unwrap();
            let (mut k2, mut v2) = (
                s.clone_htod(&cache0).unwrap(),
                s.clone_htod(&cache0).unwrap(),
            );
            kernels::rope_kv_store::rope_kv_store(
                gpu,
                RopeKvStoreArgs {
                    q: &mut q2.slice_mut(..),
                    k: &k.slice(..),
                    v: &v.slice(..),
                    k_cache: &mut k2.slice_mut(..),
                    v_cache: &mut v2.slice_mut(..),
                    positions: &pos_d.slice(..),
                    slot_mapping: &slot_d.slice(..),
                },
                &table,
                dims,
                variant,
            )
            .unwrap();
            [q2, k2, v2].map(|b| s.clone_dtoh(&b).unwrap())
        };

        let [q2h, k2h, v2h] = split("v1");
        for variant in kernels::rope_kv_store::VARIANTS {
            for (path, [q1h, k1h, v1h]) in [("fused", fused(variant)), ("split", split(variant))] {
                let what = format!("{path} {variant} {} t={t} heads={qh}/{kvh} d={d}", T::DTYPE);
                assert_eq!(bits(&q1h), bits(&q2h), "q differs: {what}");
                assert_eq!(bits(&k1h), bits(&k2h), "k_cache differs: {what}");
                assert_eq!(bits(&v1h), bits(&v2h), "v_cache differs: {what}");
            }
        }
        // Not vacuous: the caches changed where slots point, and a bad
        // position gives NaN q while a good one gives a finite q.
        let what = format!("{} t={t} heads={qh}/{kvh} d={d}", T::DTYPE);
        assert_ne!(bits(&v2h), bits(&cache0), "v_cache unchanged: {what}");
        assert_ne!(bits(&k2h), bits(&cache0), "k_cache unchanged: {what}");
        if t > 2 {
            assert!(q2h[2 * qd].to_f64().is_nan(), "{what}");
            assert!(q2h[..qd].iter().all(|x| x.to_f64().is_finite()), "{what}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_qkv_rope_kv_store_is_bit_identical_to_split_then_rope_kv_store() {
    let gpu = common::gpu();
    run::<bf16>(&gpu, 1);
    run::<f16>(&gpu, 2);
    run::<f32>(&gpu, 3);
}
