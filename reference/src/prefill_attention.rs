//! Causal prefill attention over variable-length sequences packed in one
//! batch, the reference for the prefill kernel (issue #4).
//!
//! Packed form (`prefill_packed`): q `[total, q_heads, head_dim]`, k, v
//! `[total, kv_heads, head_dim]`, `cu_seqlens` `[batch + 1]` (sequence b owns
//! rows `cu_seqlens[b]..cu_seqlens[b+1]`). Query i of a sequence attends its
//! keys 0..=i; sequences never see each other.
//!
//! Paged form (`prefill_paged`, chunked prefill and prefix reuse): the new
//! tokens' K/V are already in the paged cache; `context_lens[b]` counts all
//! of sequence b's tokens (cached prefix + new), `cu_q` packs the new queries,
//! and the last `q_len` positions of each context are the new ones: query i
//! sits at position `context_len - q_len + i` and attends positions 0..=that.
//!
//! Both are built on [`crate::paged_attention::contiguous_decode`] run once
//! per query position over its visible keys: naive and obviously causal.

use ndarray::{s, Array3, ArrayView2, ArrayView3, ArrayView4};

use crate::paged_attention::contiguous_decode;
use crate::ShapeError;

fn check_cu(
    op: &'static str,
    arg: &'static str,
    cu: &[usize],
    total: usize,
) -> Result<(), ShapeError> {
    let ok =
        cu.first() == Some(&0) && cu.last() == Some(&total) && cu.windows(2).all(|w| w[0] <= w[1]);
    if ok {
        Ok(())
    } else {
        Err(ShapeError::Invalid {
            op,
            arg,
            actual: cu.to_vec(),
            requirement: format!("non-decreasing offsets from 0 to {total}"),
        })
    }
}

/// Causal attention of packed sequences over their own packed K/V.
pub fn prefill_packed(
    q: ArrayView3<f64>,
    k: ArrayView3<f64>,
    v: ArrayView3<f64>,
    cu_seqlens: &[usize],
    scale: f64,
) -> Result<Array3<f64>, ShapeError> {
    const OP: &str = "prefill_packed";
    let (total, q_heads, head_dim) = q.dim();
    if k.dim().0 != total || k.dim().2 != head_dim {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "k",
            expected: vec![total, k.dim().1, head_dim],
            actual: k.shape().to_vec(),
        });
    }
    check_cu(OP, "cu_seqlens", cu_seqlens, total)?;
    let mut out = Array3::zeros((total, q_heads, head_dim)); // [total, q_heads, head_dim]
    for w in cu_seqlens.windows(2) {
        for i in w[0]..w[1] {
            // Keys of this sequence up to and including position i.
            let keys = s![w[0]..=i, .., ..];
            let o = contiguous_decode(q.slice(s![i, .., ..]), k.slice(keys), v.slice(keys), scale)?;
            out.slice_mut(s![i, .., ..]).assign(&o);
        }
    }
    Ok(out)
}

/// Causal attention of the new tokens of each sequence over its whole
/// context in the paged cache `[num_blocks, block_size, kv_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn prefill_paged(
    q: ArrayView3<f64>,
    k_cache: ArrayView4<f64>,
    v_cache: ArrayView4<f64>,
    block_tables: ArrayView2<i32>,
    context_lens: &[usize],
    cu_q: &[usize],
    scale: f64,
) -> Result<Array3<f64>, ShapeError> {
    const OP: &str = "prefill_paged";
    let (total, q_heads, head_dim) = q.dim();
    let (num_blocks, block_size, kv_heads, _) = k_cache.dim();
    let batch = context_lens.len();
    check_cu(OP, "cu_q", cu_q, total)?;
    if cu_q.len() != batch + 1 {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "cu_q",
            expected: vec![batch + 1],
            actual: vec![cu_q.len()],
        });
    }
    if block_tables.dim().0 != batch {
        return Err(ShapeError::Mismatch {
            op: OP,
            arg: "block_tables",
            expected: vec![batch, block_tables.dim().1],
            actual: block_tables.shape().to_vec(),
        });
    }
    let mut out = Array3::zeros((total, q_heads, head_dim));
    for b in 0..batch {
        let (ctx, q_len) = (context_lens[b], cu_q[b + 1] - cu_q[b]);
        if q_len > ctx || ctx > block_tables.dim().1 * block_size {
            return Err(ShapeError::OutOfRange {
                op: OP,
                arg: "context_lens",
                index: vec![b],
                value: ctx as i64,
                expected: format!(
                    "between the {q_len} new tokens and {} table slots",
                    block_tables.dim().1 * block_size
                ),
            });
        }
        // Gather the sequence's context into contiguous [ctx, kv_heads, head_dim].
        let mut kc = Array3::zeros((ctx, kv_heads, head_dim));
        let mut vc = Array3::zeros((ctx, kv_heads, head_dim));
        for j in 0..ctx {
            let blk = block_tables[[b, j / block_size]];
            if blk < 0 || blk as usize >= num_blocks {
                return Err(ShapeError::OutOfRange {
                    op: OP,
                    arg: "block_tables",
                    index: vec![b, j / block_size],
                    value: blk as i64,
                    expected: format!("a block id in 0..{num_blocks}"),
                });
            }
            kc.slice_mut(s![j, .., ..]).assign(&k_cache.slice(s![
                blk as usize,
                j % block_size,
                ..,
                ..
            ]));
            vc.slice_mut(s![j, .., ..]).assign(&v_cache.slice(s![
                blk as usize,
                j % block_size,
                ..,
                ..
            ]));
        }
        for i in 0..q_len {
            let pos = ctx - q_len + i;
            let keys = s![..=pos, .., ..];
            let row = cu_q[b] + i;
            let o = contiguous_decode(
                q.slice(s![row, .., ..]),
                kc.slice(keys),
                vc.slice(keys),
                scale,
            )?;
            out.slice_mut(s![row, .., ..]).assign(&o);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array4};

    fn arr3(n: usize, h: usize, d: usize, seed: usize) -> Array3<f64> {
        Array3::from_shape_fn((n, h, d), |(i, j, k)| {
            (((i * 131 + j * 31 + k * 7 + seed * 17) % 97) as f64 / 48.0) - 1.0
        })
    }

    #[test]
    fn later_tokens_do_not_change_earlier_outputs() {
        let (q, k, v) = (arr3(9, 4, 8, 1), arr3(9, 2, 8, 2), arr3(9, 2, 8, 3));
        let full = prefill_packed(q.view(), k.view(), v.view(), &[0, 9], 0.35).unwrap();
        let mut k2 = k.clone();
        k2.slice_mut(s![7.., .., ..]).fill(5.0); // change the future only
        let changed = prefill_packed(q.view(), k2.view(), v.view(), &[0, 9], 0.35).unwrap();
        assert_eq!(full.slice(s![..7, .., ..]), changed.slice(s![..7, .., ..]));
        assert_ne!(full.slice(s![7.., .., ..]), changed.slice(s![7.., .., ..]));
    }

    #[test]
    fn sequences_do_not_see_each_other_and_first_token_copies_v() {
        let (q, k, v) = (arr3(7, 2, 4, 4), arr3(7, 1, 4, 5), arr3(7, 1, 4, 6));
        let packed = prefill_packed(q.view(), k.view(), v.view(), &[0, 3, 7], 0.5).unwrap();
        let second = prefill_packed(
            q.slice(s![3.., .., ..]),
            k.slice(s![3.., .., ..]),
            v.slice(s![3.., .., ..]),
            &[0, 4],
            0.5,
        )
        .unwrap();
        assert_eq!(packed.slice(s![3.., .., ..]), second);
        // A sequence's first query sees one key: its output is that value row.
        for h in 0..2 {
            assert_eq!(packed.slice(s![3, h, ..]), v.slice(s![3, 0, ..]));
        }
    }

    #[test]
    fn paged_with_a_cached_prefix_equals_packed_over_the_whole_sequence() {
        // One sequence of 11 tokens: 6 cached, 5 new; blocks of 4 in a
        // permuted pool of 6 blocks.
        let (n, kvh, d) = (11, 2, 8);
        let (q, k, v) = (arr3(n, 4, d, 7), arr3(n, kvh, d, 8), arr3(n, kvh, d, 9));
        let want = prefill_packed(q.view(), k.view(), v.view(), &[0, n], 0.3).unwrap();
        let table = [4, 0, 5];
        let mut kc = Array4::from_elem((6, 4, kvh, d), f64::NAN);
        let mut vc = kc.clone();
        for j in 0..n {
            kc.slice_mut(s![table[j / 4], j % 4, .., ..])
                .assign(&k.slice(s![j, .., ..]));
            vc.slice_mut(s![table[j / 4], j % 4, .., ..])
                .assign(&v.slice(s![j, .., ..]));
        }
        let tables = Array2::from_shape_vec((1, 3), table.to_vec()).unwrap();
        let got = prefill_paged(
            q.slice(s![6.., .., ..]),
            kc.view(),
            vc.view(),
            tables.view(),
            &[n],
            &[0, 5],
            0.3,
        )
        .unwrap();
        let diff = (&got - &want.slice(s![6.., .., ..]))
            .mapv(f64::abs)
            .fold(0.0, |a: f64, &b| a.max(b));
        assert!(diff < 1e-12, "{diff}");
        assert!(
            got.iter().all(|x| x.is_finite()),
            "NaN slots must never be read"
        );
    }

    #[test]
    fn bad_offsets_and_contexts_are_errors_naming_the_argument() {
        let (q, k) = (arr3(3, 1, 2, 1), arr3(3, 1, 2, 2));
        let e = prefill_packed(q.view(), k.view(), k.view(), &[0, 2], 1.0).unwrap_err();
        assert_eq!((e.op(), e.arg()), ("prefill_packed", "cu_seqlens"));
        let kc = Array4::zeros((1, 4, 1, 2));
        let t = Array2::from_shape_vec((1, 1), vec![0]).unwrap();
        let e = prefill_paged(q.view(), kc.view(), kc.view(), t.view(), &[2], &[0, 3], 1.0)
            .unwrap_err();
        assert_eq!((e.op(), e.arg()), ("prefill_paged", "context_lens"));
    }
}
