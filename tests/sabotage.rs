//! The checker must catch a broken kernel: a skipped launch, one row fewer, a
//! shifted block table and a write past the end each make a case fail, for
//! every kernel and dtype, while the same case passes untouched.

mod common;

use workbench::case::Case;
use workbench::op::{Op, Sabotage};
use workbench::registry;

/// A check case where every sabotage has something to break: at least two
/// rows and (paged kernels) at least two blocks per sequence.
fn sabotage_case(op: &dyn Op) -> Case {
    let s = match op.name() {
        "rmsnorm" => "tokens=5,hidden=1025,residual=1,gen=randn,seed=11",
        "silu_mul" => "tokens=5,inter=4864,gen=randn,seed=11",
        "rope" => "tokens=5,q_heads=14,kv_heads=2,head_dim=64,max_pos=4096,gen=randn,seed=11",
        "kv_store" => "tokens=9,kv_heads=2,head_dim=64,block_size=16,pool=3,skip=1,gen=randn,seed=11",
        "rope_kv_store" => "tokens=9,q_heads=14,kv_heads=2,head_dim=64,block_size=16,max_pos=4096,pool=3,skip=1,gen=randn,seed=11",
        "paged_attention" => "batch=3,q_heads=14,kv_heads=2,head_dim=64,block_size=16,ctx=70,ragged=0,gen=randn,seed=11",
        "prefill_attention" => "batch=3,q_heads=14,kv_heads=2,head_dim=64,block_size=16,q_len=40,prefix=30,ragged=0,gen=randn,seed=11",
        other => panic!("no sabotage case for {other}: add one here"),
    };
    s.parse().expect("valid case")
}

#[test]
fn every_kernel_has_a_sabotage_case() {
    for op in registry::OPS {
        op.check_keys(&sabotage_case(*op)).expect("valid");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sabotaged_launches_fail_and_clean_ones_pass() {
    let gpu = common::gpu();
    let mut caught = 0;
    for op in registry::OPS {
        let case = sabotage_case(*op);
        for variant in op.variants().iter().map(|v| v.name) {
            for &dtype in op.dtypes() {
                let clean = op
                    .run(&gpu, &case, dtype, variant, Sabotage::None)
                    .expect("runs");
                assert!(
                    clean.pass(),
                    "{} {variant} {dtype} {case}: clean run failed: {}",
                    op.name(),
                    clean.failure_summary()
                );
                for &s in op.sabotages() {
                    let m = op.run(&gpu, &case, dtype, variant, s).expect("runs");
                    assert!(
                        !m.pass(),
                        "{} {variant} {dtype} {case}: sabotage {s:?} was NOT caught",
                        op.name()
                    );
                    caught += 1;
                }
            }
        }
    }
    // Every (kernel, variant, dtype, sabotage) was run and caught.
    let expected: usize = registry::OPS
        .iter()
        .map(|o| o.variants().len() * o.dtypes().len() * o.sabotages().len())
        .sum();
    assert_eq!(caught, expected);
}
