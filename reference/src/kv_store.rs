//! Scatter of new keys and values into a paged KV cache (vLLM's
//! `reshape_and_cache`).
//!
//! Shapes: `k`, `v` are `[tokens, kv_heads, head_dim]`; `k_cache`, `v_cache`
//! are `[num_blocks, block_size, kv_heads, head_dim]`; `slot_mapping` has one
//! entry per token. A slot is a flat index into the first two cache
//! dimensions:
//!
//! ```text
//! block  = slot / block_size
//! offset = slot % block_size
//! cache[block, offset, h, :] = k[t, h, :]      (likewise v)
//! ```
//!
//! A negative slot (vLLM pads with -1) skips its token. A slot at or beyond
//! `num_blocks * block_size` is an error. Every argument is checked before
//! anything is written, so on error both caches are untouched; on success
//! only the addressed slots change. If two tokens share a slot the later
//! token wins. Values are copied exactly: there is no rounding (the GPU
//! kernel may convert to its cache dtype).

use ndarray::{Array4, ArrayView3};

use crate::ShapeError;

const OP: &str = "kv_store";

/// Writes `k[t]` and `v[t]` to slot `slot_mapping[t]` of the caches.
///
/// `k`, `v`: `[tokens, kv_heads, head_dim]`; caches:
/// `[num_blocks, block_size, kv_heads, head_dim]`; `slot_mapping`: `[tokens]`.
pub fn kv_store(
    k: ArrayView3<f64>,
    v: ArrayView3<f64>,
    slot_mapping: &[i64],
    k_cache: &mut Array4<f64>,
    v_cache: &mut Array4<f64>,
) -> Result<(), ShapeError> {
    let (tokens, kv_heads, head_dim) = k.dim();
    if v.shape() != k.shape() {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "v",
            expected: k.shape().to_vec(),
            actual: v.shape().to_vec(),
        });
    }
    if slot_mapping.len() != tokens {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "slot_mapping",
            expected: vec![tokens],
            actual: vec![slot_mapping.len()],
        });
    }
    let (num_blocks, block_size, cache_heads, cache_dim) = k_cache.dim();
    if (cache_heads, cache_dim) != (kv_heads, head_dim) {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "k_cache",
            expected: vec![num_blocks, block_size, kv_heads, head_dim],
            actual: k_cache.shape().to_vec(),
        });
    }
    if v_cache.shape() != k_cache.shape() {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "v_cache",
            expected: k_cache.shape().to_vec(),
            actual: v_cache.shape().to_vec(),
        });
    }
    let capacity = num_blocks * block_size;
    for (t, &slot) in slot_mapping.iter().enumerate() {
        // usize -> u64 is lossless on every supported target.
        if slot >= 0 && slot as u64 >= capacity as u64 {
            return Err(ShapeError::OutOfRange {
                op: OP,
                arg: "slot_mapping",
                index: vec![t],
                value: slot,
                expected: format!(
                    "a negative slot (skip) or a slot < {capacity} (num_blocks {num_blocks} * block_size {block_size})"
                ),
            });
        }
    }

    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        // In range by the check above, so it fits in usize.
        let slot = slot as usize;
        let (block, offset) = (slot / block_size, slot % block_size);
        for h in 0..kv_heads {
            for d in 0..head_dim {
                k_cache[[block, offset, h, d]] = k[[t, h, d]];
                v_cache[[block, offset, h, d]] = v[[t, h, d]];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{close, random, rng};
    use ndarray::{array, s, Array3};
    use proptest::prelude::*;
    use rand::seq::SliceRandom;

    #[test]
    fn small_cache_by_hand() {
        // 2 blocks of 2 slots, 1 head, head_dim 2; tokens go to slots 3, -1, 0
        let k = array![[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]];
        let v = -&k;
        let mut kc = Array4::from_elem((2, 2, 1, 2), 9.0);
        let mut vc = kc.clone();
        kv_store(k.view(), v.view(), &[3, -1, 0], &mut kc, &mut vc).unwrap();
        let expected = array![[[[5.0, 6.0]], [[9.0, 9.0]]], [[[9.0, 9.0]], [[1.0, 2.0]]]];
        assert_eq!(kc, expected);
        assert_eq!(vc[[1, 1, 0, 1]], -2.0);
        assert_eq!(vc[[0, 0, 0, 0]], -5.0);
        assert_eq!(vc[[0, 1, 0, 0]], 9.0);
    }

    #[test]
    fn later_token_wins_on_shared_slot() {
        let k = array![[[1.0]], [[2.0]]];
        let mut kc = Array4::zeros((1, 1, 1, 1));
        let mut vc = kc.clone();
        kv_store(k.view(), k.view(), &[0, 0], &mut kc, &mut vc).unwrap();
        assert_eq!(kc[[0, 0, 0, 0]], 2.0);
    }

    #[test]
    fn errors_name_op_and_arg() {
        let k = Array3::<f64>::zeros((2, 2, 4));
        let cache = Array4::<f64>::zeros((3, 4, 2, 4));
        let run = |v: &Array3<f64>, slots: &[i64], kc: &Array4<f64>, vc: &Array4<f64>| {
            let (mut kc, mut vc) = (kc.clone(), vc.clone());
            kv_store(k.view(), v.view(), slots, &mut kc, &mut vc)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            run(&Array3::zeros((2, 2, 3)), &[0, 1], &cache, &cache),
            "kv_store: v has shape [2, 2, 3], expected [2, 2, 4]"
        );
        assert_eq!(
            run(&k, &[0], &cache, &cache),
            "kv_store: slot_mapping has shape [1], expected [2]"
        );
        assert_eq!(
            run(&k, &[0, 1], &Array4::zeros((3, 4, 1, 4)), &cache),
            "kv_store: k_cache has shape [3, 4, 1, 4], expected [3, 4, 2, 4]"
        );
        assert_eq!(
            run(&k, &[0, 1], &cache, &Array4::zeros((2, 4, 2, 4))),
            "kv_store: v_cache has shape [2, 4, 2, 4], expected [3, 4, 2, 4]"
        );
        let msg = run(&k, &[-1, 12], &cache, &cache);
        assert!(
            msg.starts_with("kv_store: slot_mapping[1] = 12 is out of range"),
            "{msg}"
        );
    }

    #[test]
    fn error_leaves_caches_untouched() {
        let k = Array3::from_elem((2, 1, 1), 1.0);
        let mut kc = Array4::zeros((1, 2, 1, 1));
        let mut vc = kc.clone();
        // token 0 is valid, token 1 is not: nothing may be written.
        assert!(kv_store(k.view(), k.view(), &[0, 2], &mut kc, &mut vc).is_err());
        assert!(kc.iter().chain(vc.iter()).all(|&x| x == 0.0));
    }

    proptest! {
        #[test]
        fn store_then_read_back(
            tokens in 0usize..8,
            kv_heads in 1usize..3,
            head_dim in 1usize..6,
            block_size in 1usize..5,
            extra_blocks in 0usize..3,
            seed: u64,
        ) {
            let mut r = rng(seed);
            let num_blocks = tokens.div_ceil(block_size) + extra_blocks;
            let k = random(&mut r, (tokens, kv_heads, head_dim));
            let v = random(&mut r, (tokens, kv_heads, head_dim));
            // distinct slots, some tokens skipped with a negative slot
            let mut pool: Vec<i64> = (0..(num_blocks * block_size) as i64).collect();
            pool.shuffle(&mut r);
            let slots: Vec<i64> = pool[..tokens]
                .iter()
                .enumerate()
                .map(|(t, &s)| if t % 3 == 2 { -1 - t as i64 } else { s })
                .collect();
            let shape = (num_blocks, block_size, kv_heads, head_dim);
            let k_before = random(&mut r, shape);
            let v_before = random(&mut r, shape);
            let (mut kc, mut vc) = (k_before.clone(), v_before.clone());
            kv_store(k.view(), v.view(), &slots, &mut kc, &mut vc).unwrap();

            let mut written = vec![false; num_blocks * block_size];
            for (t, &slot) in slots.iter().enumerate() {
                if slot < 0 {
                    continue;
                }
                let (b, o) = (slot as usize / block_size, slot as usize % block_size);
                written[slot as usize] = true;
                prop_assert!(close(&kc.slice(s![b, o, .., ..]), &k.slice(s![t, .., ..]), 0.0));
                prop_assert!(close(&vc.slice(s![b, o, .., ..]), &v.slice(s![t, .., ..]), 0.0));
            }
            // every slot not addressed by a non-negative entry is unchanged
            for (slot, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
                let (b, o) = (slot / block_size, slot % block_size);
                prop_assert!(close(&kc.slice(s![b, o, .., ..]), &k_before.slice(s![b, o, .., ..]), 0.0));
                prop_assert!(close(&vc.slice(s![b, o, .., ..]), &v_before.slice(s![b, o, .., ..]), 0.0));
            }
        }

        #[test]
        fn negative_slots_touch_nothing(tokens in 0usize..6, neg in -1000i64..0, seed: u64) {
            let mut r = rng(seed);
            let k = random(&mut r, (tokens, 2, 3));
            let before = random(&mut r, (2, 4, 2, 3));
            let (mut kc, mut vc) = (before.clone(), before.clone());
            kv_store(k.view(), k.view(), &vec![neg; tokens], &mut kc, &mut vc).unwrap();
            prop_assert_eq!(&kc, &before);
            prop_assert_eq!(&vc, &before);
        }
    }
}
