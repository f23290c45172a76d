//! RoPE on q and k followed by the scatter of rotated k and v into the paged
//! cache: the composition of [`crate::rope::rope_neox`] and
//! [`crate::kv_store::kv_store`], which the fused GPU kernel must equal.
//!
//! Shapes: `q` `[tokens, q_heads, head_dim]`, `k`, `v` `[tokens, kv_heads,
//! head_dim]`, `positions` and `slot_mapping` `[tokens]`, caches
//! `[num_blocks, block_size, kv_heads, head_dim]`. Returns the rotated q; the
//! caches receive rotated k and v at the slots (negative = skip), as
//! `kv_store` writes them.

use ndarray::{Array3, Array4, ArrayView3};

use crate::ShapeError;

/// Rotates q (returned) and k, then stores rotated k and v into the caches.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_store(
    q: ArrayView3<f64>,
    k: ArrayView3<f64>,
    v: ArrayView3<f64>,
    positions: &[i32],
    slot_mapping: &[i64],
    theta: f64,
    k_cache: &mut Array4<f64>,
    v_cache: &mut Array4<f64>,
) -> Result<Array3<f64>, ShapeError> {
    let q_rot = crate::rope::rope_neox(q, positions, theta)?;
    let k_rot = crate::rope::rope_neox(k, positions, theta)?;
    crate::kv_store::kv_store(k_rot.view(), v, slot_mapping, k_cache, v_cache)?;
    Ok(q_rot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn equals_rope_then_kv_store() {
        let q = Array3::from_shape_fn((3, 4, 8), |(t, h, d)| {
            (t * 31 + h * 7 + d) as f64 * 0.01 - 0.5
        });
        let k = Array3::from_shape_fn((3, 2, 8), |(t, h, d)| {
            (t * 13 + h * 5 + d) as f64 * 0.02 - 0.3
        });
        let v = k.mapv(|x| x * 3.0);
        let (pos, slots) = ([5, 0, 77], [7i64, -1, 2]);
        let mut kc = Array4::from_elem((2, 4, 2, 8), f64::NAN);
        let mut vc = kc.clone();
        let qr = rope_kv_store(
            q.view(),
            k.view(),
            v.view(),
            &pos,
            &slots,
            1e4,
            &mut kc,
            &mut vc,
        )
        .unwrap();
        assert_eq!(qr, crate::rope::rope_neox(q.view(), &pos, 1e4).unwrap());
        let kr = crate::rope::rope_neox(k.view(), &pos, 1e4).unwrap();
        // token 0 -> slot 7 = block 1, offset 3; token 2 -> slot 2; token 1 skipped.
        assert_eq!(
            kc.slice(ndarray::s![1, 3, .., ..]),
            kr.slice(ndarray::s![0, .., ..])
        );
        assert_eq!(
            vc.slice(ndarray::s![0, 2, .., ..]),
            v.slice(ndarray::s![2, .., ..])
        );
        assert_eq!(kc.iter().filter(|x| !x.is_nan()).count(), 2 * 2 * 8);
    }

    #[test]
    fn a_bad_slot_is_an_error_naming_kv_store() {
        let q = Array3::zeros((1, 1, 2));
        let k = Array3::zeros((1, 1, 2));
        let mut kc = Array4::zeros((1, 2, 1, 2));
        let mut vc = kc.clone();
        let e = rope_kv_store(
            q.view(),
            k.view(),
            k.view(),
            &[0],
            &[9],
            1e4,
            &mut kc,
            &mut vc,
        )
        .unwrap_err();
        assert!(e.to_string().contains("kv_store"), "{e}");
    }
}
