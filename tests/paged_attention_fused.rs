//! `paged_attention_fused_qkv` (v3f and v5f, kernels/cuda/paged_attention.cu;
//! v7 is v5f with v7's merge, v8 v7 with padded rows, v9 v8 with a deep
//! ring under its own split plan),
//! the engine's decode attention straight from its q|k|v projection, must be
//! bit-identical to the two launches it replaces: `qkv_rope_kv_store` (bias,
//! RoPE, store of the new token) then `paged_attention` v3, v5, v7, v8 or v9, each checked
//! against its f64 CPU reference by `workbench check` and the GPU
//! proptests. Same output bits and same cache bits, over ragged contexts
//! around the block edges, long ones that split, a split cap, block sizes
//! 8/16/32, NaN in every cache slot that holds no live token and in the new
//! token's slot before the call (a block that read it before its own store
//! would give NaN), a row whose slot is -1 (not stored) and one whose
//! position is outside the RoPE table (NaN q and k in both paths).

use half::{bf16, f16};
use kernels::paged_attention::{FusedQkv, PagedAttentionDims};
use kernels::rope::RopeTable;
use kernels::rope_kv_store::RopeKvStoreDims;
use kernels::{Gpu, Storage};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

mod common;

/// (q_heads, kv_heads, head_dim, block_size, max_split_tokens): Qwen2-0.5B,
/// -1.5B and -7B heads, head_dim 80/96/32/256, a group of 1 and of 16.
const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
    (14, 2, 64, 16, 0),
    (12, 2, 128, 16, 0),
    (28, 4, 128, 32, 0),
    (14, 2, 64, 8, 64),
    (6, 1, 80, 16, 0),
    (16, 1, 96, 16, 128),
    (4, 4, 32, 8, 0),
    (8, 2, 256, 16, 0),
];
/// Contexts (with the new token): 1, block edges, and long ones.
const LENS: [usize; 9] = [1, 7, 15, 16, 17, 33, 300, 1000, 2047];
const MAX_POS: usize = 4096;

fn bits<T: Storage>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn run<T: Storage>(gpu: &Gpu, seed: u64) {
    for variant in ["v3", "v5", "v7", "v8", "v9"] {
        run_variant::<T>(gpu, seed, variant);
    }
}

fn run_variant<T: Storage>(gpu: &Gpu, seed: u64, variant: &str) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let s = gpu.stream();
    for &(qh, kvh, d, bs, cap) in &SHAPES {
        let batch = LENS.len();
        let (qd, kd) = (qh * d, kvh * d);
        let row = qd + 2 * kd;
        let mbps = LENS.iter().max().unwrap().div_ceil(bs);
        let used: usize = LENS.iter().map(|l| l.div_ceil(bs)).sum();
        let num_blocks = 3 * used;
        let num_slots = num_blocks * bs;
        // Block tables: a random permutation of the pool; entries past a
        // sequence's last block hold stale but valid ids.
        let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
        perm.shuffle(&mut rng);
        let mut tables = vec![0i32; batch * mbps];
        let mut next = 0;
        let mut live = vec![false; num_slots];
        let (mut positions, mut slots) = (vec![0i32; batch], vec![0i64; batch]);
        for (b, &n) in LENS.iter().enumerate() {
            for j in 0..mbps {
                tables[b * mbps + j] = if j < n.div_ceil(bs) {
                    next += 1;
                    perm[next - 1]
                } else {
                    perm[rng.random_range(0..num_blocks)]
                };
            }
            let slot_of = |j: usize| tables[b * mbps + j / bs] as usize * bs + j % bs;
            for j in 0..n - 1 {
                live[slot_of(j)] = true;
            }
            positions[b] = (n - 1) as i32;
            slots[b] = slot_of(n - 1) as i64;
        }
        // Row 2's new token is not stored (its slot stays NaN in both
        // paths); row 3's position is outside the table (NaN q and k).
        slots[2] = -1;
        positions[3] = MAX_POS as i32 + 3;
        let cache0: Vec<T> = (0..num_slots * kd)
            .map(|i| {
                if live[i / kd] {
                    T::from_f64(rng.random_range(-2.0..2.0))
                } else {
                    T::from_f64(f64::NAN)
                }
            })
            .collect();
        let qkv: Vec<T> = (0..batch * row)
            .map(|_| T::from_f64(rng.random_range(-2.0..2.0)))
            .collect();
        let bias: Vec<T> = (0..row)
            .map(|_| T::from_f64(rng.random_range(-0.5..0.5)))
            .collect();
        let lens: Vec<i32> = LENS.iter().map(|&n| n as i32).collect();

        let table = RopeTable::new(gpu, MAX_POS, d, 1e6).unwrap();
        let up = |v: &[i32]| s.clone_htod(v).unwrap();
        let (tables_d, lens_d, pos_d) = (up(&tables), up(&lens), up(&positions));
        let slot_d = s.clone_htod(&slots).unwrap();
        let (qkv_d, bias_d) = (s.clone_htod(&qkv).unwrap(), s.clone_htod(&bias).unwrap());
        let pad = PagedAttentionDims {
            batch,
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
            block_size: bs,
            num_blocks,
            max_blocks_per_seq: mbps,
            scale: 1.0 / (d as f32).sqrt(),
            max_split_tokens: cap,
        };
        let nan = vec![T::from_f64(f64::NAN); batch * qd];

        // The pair: qkv_rope_kv_store, then v3.
        let dims = RopeKvStoreDims {
            tokens: batch,
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
            block_size: bs,
            num_blocks,
        };
        let [q, k1, v1] = common::qkv_rope_kv_store_fresh(
            gpu,
            &qkv_d,
            &bias_d,
            &cache0,
            &pos_d,
            &slot_d,
            &table,
            dims,
            kernels::rope_kv_store::PRODUCTION,
        );
        let mut out1 = s.clone_htod(&nan).unwrap();
        kernels::paged_attention::paged_attention(
            gpu,
            &mut out1.slice_mut(..),
            &q.slice(..),
            &k1.slice(..),
            &v1.slice(..),
            &tables_d.slice(..),
            &lens_d.slice(..),
            pad,
            variant,
        )
        .unwrap();

        // v3f.
        let (mut k2, mut v2) = (
            s.clone_htod(&cache0).unwrap(),
            s.clone_htod(&cache0).unwrap(),
        );
        let mut out2 = s.clone_htod(&nan).unwrap();
        kernels::paged_attention::paged_attention_fused_qkv(
            gpu,
            &mut out2.slice_mut(..),
            FusedQkv {
                qkv: &qkv_d.slice(..),
                bias: &bias_d.slice(..),
                k_cache: &mut k2.slice_mut(..),
                v_cache: &mut v2.slice_mut(..),
                positions: &pos_d.slice(..),
                slot_mapping: &slot_d.slice(..),
            },
            &tables_d.slice(..),
            &lens_d.slice(..),
            &table,
            pad,
            variant,
        )
        .unwrap();

        let what = format!(
            "{variant} {} heads={qh}/{kvh} d={d} block={bs} cap={cap}",
            T::DTYPE
        );
        let (o1, o2) = (s.clone_dtoh(&out1).unwrap(), s.clone_dtoh(&out2).unwrap());
        assert_eq!(bits(&o1), bits(&o2), "out differs: {what}");
        let k1h = s.clone_dtoh(&k1).unwrap();
        assert_eq!(
            bits(&k1h),
            bits(&s.clone_dtoh(&k2).unwrap()),
            "k_cache differs: {what}"
        );
        assert_eq!(
            bits(&s.clone_dtoh(&v1).unwrap()),
            bits(&s.clone_dtoh(&v2).unwrap()),
            "v_cache differs: {what}"
        );
        // Not vacuous: rows with a stored new token are finite, row 2 read
        // its unstored NaN slot and row 3 its NaN q, and the caches changed.
        for (b, _) in LENS.iter().enumerate() {
            let r = &o2[b * qd..(b + 1) * qd];
            if b == 2 || b == 3 {
                assert!(r.iter().all(|x| x.to_f64().is_nan()), "row {b}: {what}");
            } else {
                assert!(r.iter().all(|x| x.to_f64().is_finite()), "row {b}: {what}");
            }
        }
        assert_ne!(bits(&k1h), bits(&cache0), "k_cache unchanged: {what}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_decode_attention_is_bit_identical_to_the_pair_bf16() {
    let gpu = common::gpu();
    for seed in 0..3 {
        run::<bf16>(&gpu, seed);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_decode_attention_is_bit_identical_to_the_pair_f16() {
    let gpu = common::gpu();
    for seed in 10..13 {
        run::<f16>(&gpu, seed);
    }
}

#[test]
fn fused_decode_attention_refuses_f32_and_unknown_head_dims() {
    assert!(!kernels::paged_attention::fused_qkv_supported(
        kernels::DType::F32,
        64
    ));
    assert!(!kernels::paged_attention::fused_qkv_supported(
        kernels::DType::BF16,
        48
    ));
    assert!(kernels::paged_attention::fused_qkv_supported(
        kernels::DType::BF16,
        64
    ));
}
