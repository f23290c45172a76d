//! criterion benches of the production kernels through the one timing path
//! (`kernels::timing::time_launches`: rotated inputs, CUDA-graph replay,
//! events), so criterion's statistics sit on the same numbers `workbench
//! roofline` reports. Each case is checked against its reference first.
//! Without a usable GPU it prints why and benches nothing.
//!
//! `cargo bench --bench kernels` on a GPU host.

use criterion::{criterion_group, criterion_main, Criterion};
use kernels::timing::{rotation_sets, time_launches, TimingOpts};
use kernels::{DType, Gpu};
use std::time::Duration;
use workbench::op::Sabotage;
use workbench::registry;

fn bench(c: &mut Criterion) {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipping GPU benches: {e}");
            return;
        }
    };
    let l2 = gpu.info().l2_bytes.max(0) as u64;
    let mut g = c.benchmark_group("kernels");
    g.sample_size(10);
    for op in registry::OPS {
        let Some(variant) = op.variants().iter().find(|v| v.production) else {
            continue;
        };
        // One decode-sized and one prefill-sized perf case per kernel.
        let cases = op.perf_cases();
        for case in [cases.first(), cases.get(cases.len().saturating_sub(3))]
            .into_iter()
            .flatten()
        {
            let dtype = DType::BF16;
            match op.run(&gpu, case, dtype, variant.name, Sabotage::None) {
                Ok(m) if m.pass() => {}
                Ok(m) => {
                    eprintln!(
                        "{} {case}: FAIL, not timed: {}",
                        op.name(),
                        m.failure_summary()
                    );
                    continue;
                }
                Err(e) => {
                    eprintln!("{} {case}: {e}", op.name());
                    continue;
                }
            }
            let Ok(bytes) = op.bytes_moved(case, dtype) else {
                continue;
            };
            let sets = rotation_sets(bytes, l2, 64);
            let Ok(mut b) = op.bench(&gpu, case, dtype, variant.name, sets) else {
                continue;
            };
            g.bench_function(
                format!("{} {} {case}", op.name(), variant.name),
                |bencher| {
                    bencher.iter_custom(|iters| {
                        let opts = TimingOpts {
                            min_replays: iters as usize,
                            max_replays: iters as usize,
                            target_ms: 0.0,
                            ..Default::default()
                        };
                        match time_launches(&gpu, sets, |s| b.launch(&gpu, s), opts) {
                            Ok(t) => Duration::from_secs_f64(t.median_us * 1e-6 * iters as f64),
                            Err(e) => panic!("timing {}: {e}", op.name()),
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
