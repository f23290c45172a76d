//! Each kernel against its CPU reference over random shapes, value regimes and
//! seeds: 256 cases per kernel and dtype. A failure prints the command that
//! replays it (`workbench check <kernel> --case '...'`).

mod common;

use kernels::DType;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rand::SeedableRng;
use workbench::op::{Op, Sabotage};
use workbench::registry;

fn sweep(name: &str) {
    let op: &dyn Op = registry::find(name).expect("kernel is registered");
    let gpu = common::gpu();
    let variant = op
        .variants()
        .iter()
        .find(|v| v.production)
        .expect("a production variant")
        .name;
    for &dtype in op.dtypes() {
        let mut runner = TestRunner::new(Config {
            cases: 256,
            max_shrink_iters: 16,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&any::<u64>(), |seed| {
            let case = op.random_case(&mut rand::rngs::SmallRng::seed_from_u64(seed));
            let replay = format!(
                "workbench check {} --case '{case},dtype={dtype}'",
                op.name()
            );
            let m = op
                .run(&gpu, &case, dtype, variant, Sabotage::None)
                .map_err(|e| TestCaseError::fail(format!("{e}\nreplay: {replay}")))?;
            prop_assert!(m.pass(), "{}\nreplay: {}", m.failure_summary(), replay);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{name} {variant} {dtype}: {e}");
        }
    }
    let _ = DType::ALL;
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_rmsnorm() {
    sweep("rmsnorm");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_silu_mul() {
    sweep("silu_mul");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_rope() {
    sweep("rope");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_kv_store() {
    sweep("kv_store");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_rope_kv_store() {
    sweep("rope_kv_store");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_paged_attention() {
    sweep("paged_attention");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn proptest_prefill_attention() {
    sweep("prefill_attention");
}

#[test]
fn every_registered_kernel_has_a_proptest_here() {
    let src = include_str!("gpu_proptest.rs");
    for name in registry::names() {
        assert!(
            src.contains(&format!("fn proptest_{name}()")),
            "no GPU proptest for {name}"
        );
    }
}
