//! The one timing path: roofline, benches and the engine's breakdowns all
//! call [`time_launches`].
//!
//! Method: the caller prepares `sets` independent input sets, enough that
//! together they exceed twice the L2 (so each launch reads from HBM, not
//! from the cache the previous launch warmed). Every set is launched once
//! eagerly (errors surface here, first-use costs are paid), then one CUDA
//! graph is captured that launches on every set in turn. The graph is
//! replayed a few times to warm up, then timed replay by replay with CUDA
//! events until `target_ms` of GPU time or `max_replays`; the time per
//! launch is replay time / sets. Graph replay removes host launch overhead,
//! which would otherwise dominate microsecond kernels; peers are timed the
//! same way (benches/peers/).

use crate::device::Gpu;
use crate::error::{KernelError, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

#[derive(Clone, Copy, Debug)]
pub struct TimingOpts {
    pub warmup_replays: usize,
    pub min_replays: usize,
    pub max_replays: usize,
    /// Stop once this much GPU time has been measured (and min_replays reached).
    pub target_ms: f64,
}

impl Default for TimingOpts {
    fn default() -> Self {
        TimingOpts {
            warmup_replays: 3,
            min_replays: 15,
            max_replays: 2000,
            target_ms: 150.0,
        }
    }
}

/// Per-launch times over the timed replays, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_us: f64,
    pub p10_us: f64,
    pub p90_us: f64,
    pub min_us: f64,
    pub replays: usize,
    pub launches_per_replay: usize,
}

/// How many input sets make `bytes_per_launch` exceed twice the L2: at least
/// 1, at most `cap`.
pub fn rotation_sets(bytes_per_launch: u64, l2_bytes: u64, cap: usize) -> usize {
    let need = (2 * l2_bytes).div_ceil(bytes_per_launch.max(1)) as usize;
    need.clamp(1, cap.max(1))
}

/// Quantile of sorted data (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn summarize(mut per_launch_us: Vec<f64>, launches_per_replay: usize) -> Timing {
    per_launch_us.sort_by(f64::total_cmp);
    Timing {
        median_us: quantile(&per_launch_us, 0.5),
        p10_us: quantile(&per_launch_us, 0.1),
        p90_us: quantile(&per_launch_us, 0.9),
        min_us: per_launch_us.first().copied().unwrap_or(f64::NAN),
        replays: per_launch_us.len(),
        launches_per_replay,
    }
}

/// Time `launch(set)` for set in 0..sets, as described in the module docs.
pub fn time_launches(
    gpu: &Gpu,
    sets: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
    opts: TimingOpts,
) -> Result<Timing> {
    let sets = sets.max(1);
    let stream = gpu.stream();
    for s in 0..sets {
        launch(s)?;
    }
    gpu.synchronize()?;

    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(KernelError::driver("cuStreamBeginCapture"))?;
    let mut captured = Ok(());
    for s in 0..sets {
        captured = launch(s);
        if captured.is_err() {
            break;
        }
    }
    // End the capture even after a failed launch, so the stream stays usable.
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(KernelError::driver("cuStreamEndCapture"))?;
    captured?;
    let graph = graph.ok_or_else(|| KernelError::Unsupported {
        op: "time_launches",
        what: "graph capture produced no graph".into(),
    })?;

    for _ in 0..opts.warmup_replays {
        graph
            .launch()
            .map_err(KernelError::driver("cuGraphLaunch"))?;
    }
    gpu.synchronize()?;
    let (start, end) = (gpu.timing_event()?, gpu.timing_event()?);
    let mut per_launch = Vec::new();
    let mut total_ms = 0.0;
    while per_launch.len() < opts.max_replays
        && (per_launch.len() < opts.min_replays || total_ms < opts.target_ms)
    {
        start
            .record(stream)
            .map_err(KernelError::driver("cuEventRecord"))?;
        graph
            .launch()
            .map_err(KernelError::driver("cuGraphLaunch"))?;
        end.record(stream)
            .map_err(KernelError::driver("cuEventRecord"))?;
        end.synchronize()
            .map_err(KernelError::driver("cuEventSynchronize"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(KernelError::driver("cuEventElapsedTime"))? as f64;
        total_ms += ms;
        per_launch.push(ms * 1e3 / sets as f64);
    }
    Ok(summarize(per_launch, sets))
}

/// Time a closure that is not graph-capturable (a library call with host
/// work), eagerly between events: used for the cuBLAS ceiling.
pub fn time_eager(gpu: &Gpu, mut f: impl FnMut() -> Result<()>, reps: usize) -> Result<Timing> {
    f()?;
    gpu.synchronize()?;
    let (start, end) = (gpu.timing_event()?, gpu.timing_event()?);
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        start
            .record(gpu.stream())
            .map_err(KernelError::driver("cuEventRecord"))?;
        f()?;
        end.record(gpu.stream())
            .map_err(KernelError::driver("cuEventRecord"))?;
        end.synchronize()
            .map_err(KernelError::driver("cuEventSynchronize"))?;
        v.push(
            start
                .elapsed_ms(&end)
                .map_err(KernelError::driver("cuEventElapsedTime"))? as f64
                * 1e3,
        );
    }
    Ok(summarize(v, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_covers_twice_the_l2() {
        let l2 = 50 << 20;
        assert_eq!(rotation_sets(1 << 30, l2, 64), 1);
        assert_eq!(rotation_sets(10 << 20, l2, 64), 10);
        assert_eq!(rotation_sets(1000, l2, 64), 64);
        assert_eq!(rotation_sets(0, l2, 64), 64);
    }

    #[test]
    fn summary_quantiles() {
        let t = summarize((1..=11).map(|x| x as f64).collect(), 4);
        assert_eq!(
            (t.median_us, t.p10_us, t.p90_us, t.min_us),
            (6.0, 2.0, 10.0, 1.0)
        );
        assert_eq!((t.replays, t.launches_per_replay), (11, 4));
    }
}
