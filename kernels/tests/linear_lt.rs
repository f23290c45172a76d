//! `LtLinear` (cuBLASLt, tuned per shape) against an f64 CPU reference.
//!
//! Inputs are random in [-1, 1), rounded to the storage type; the reference
//! is computed in f64 from the rounded values. Tolerance per element:
//! `atol + max(rtol·|ref|, 1e-5·Σ|x·w|)` with atol/rtol/rel_l2 as
//! `workbench::op::rounded_once` (the output is rounded once from f32), and
//! the f32-accumulation part measured against the magnitude of the terms,
//! since a dot product's terms cancel (CHALLENGES.md #2,
//! `Metrics::compare_scaled`). For f32 that is exactly
//! `1e-5 + 1e-5·max(|ref|, Σ|x·w|)`. Plus ‖Δ‖/‖ref‖ <= rel_l2.
//!
//! GPU tests are ignored here; `.gpu/run-tests` runs them.

use half::{bf16, f16};
use kernels::linear_lt::{LtLinear, TUNE_MAX_TOKENS};
use kernels::{Gpu, KernelError, Storage};

fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| panic!("{e}"))
}

mod common;
use common::{reference, rounded_once, Rng, ACC_RTOL};

/// Check y (host copy of the [tokens, ldy] buffer) against the reference;
/// the gap columns out..ldy must still hold the NaN sentinel's bits.
#[allow(clippy::too_many_arguments)]
fn check<T: Storage>(
    got: &[T],
    want: &[f64],
    scale: &[f64],
    tokens: usize,
    out: usize,
    ldy: usize,
    sentinel: T,
    label: &str,
) {
    let tol = rounded_once(T::DTYPE);
    let (mut bad, mut first) = (0usize, Vec::new());
    let (mut sq_err, mut sq_ref, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    for t in 0..tokens {
        for o in 0..out {
            let (g, r, s) = (
                got[t * ldy + o].to_f64(),
                want[t * out + o],
                scale[t * out + o],
            );
            let allowed = tol.atol + (tol.rtol * r.abs()).max(ACC_RTOL * s);
            let d = (g - r).abs();
            let within = d <= allowed; // false for NaN
            if !within {
                bad += 1;
                if first.len() < 5 {
                    first.push(format!(
                        "y[{t},{o}] got {g} want {r} (allowed ±{allowed:.3e})"
                    ));
                }
            } else {
                worst = worst.max(d / allowed);
            }
            sq_err += d * d;
            sq_ref += r * r;
        }
        for o in out..ldy {
            if let Some(v) = got.get(t * ldy + o) {
                assert_eq!(
                    v.to_bits_u32(),
                    sentinel.to_bits_u32(),
                    "{label}: gap column y[{t},{o}] was written ({v:?})"
                );
            }
        }
    }
    assert!(
        bad == 0,
        "{label}: {bad} of {} elements out of tolerance: {first:?}",
        tokens * out
    );
    let rel_l2 = (sq_err / sq_ref).sqrt();
    assert!(
        rel_l2 <= tol.rel_l2,
        "{label}: ‖Δ‖/‖ref‖ = {rel_l2:.3e} > {:.1e}",
        tol.rel_l2
    );
    eprintln!("{label}: ok, worst share of tolerance {worst:.3}, ‖Δ‖/‖ref‖ {rel_l2:.2e}");
}

/// (tokens, in, out, ldy): decode-sized Qwen2-0.5B projections, a tiny one,
/// and one with ldy > out (gate/up written side by side).
const SHAPES: [(usize, usize, usize, usize); 5] = [
    (1, 64, 96, 96),
    (7, 896, 1152, 1152),
    (256, 4864, 896, 896),
    (256, 896, 9728, 9728),
    (300, 128, 64, 200),
];

fn run_dtype<T: Storage>(seed: u64) {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut lt = LtLinear::new(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng(seed);
    let sentinel = T::from_f64(f64::NAN);
    for (i, &(tokens, inf, out, ldy)) in SHAPES.iter().enumerate() {
        let label = format!("{} tokens={tokens} in={inf} out={out} ldy={ldy}", T::DTYPE);
        let x: Vec<T> = rng.values(tokens * inf);
        let w: Vec<T> = rng.values(out * inf);
        let (want, scale) = reference(&x, &w, tokens, inf, out);
        let dx = stream.clone_htod(&x).unwrap();
        let dw = stream.clone_htod(&w).unwrap();
        let nan_y = vec![sentinel; tokens * ldy];
        let mut dy = stream.clone_htod(&nan_y).unwrap();

        lt.linear(
            &gpu,
            &mut dy.slice_mut(..),
            ldy,
            &dx.slice(..),
            &dw.slice(..),
            tokens,
            inf,
            out,
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let got: Vec<T> = stream.clone_dtoh(&dy).unwrap();
        check(&got, &want, &scale, tokens, out, ldy, sentinel, &label);

        let plans = lt.plans();
        assert_eq!(plans.len(), i + 1, "{label}: one new plan per shape");
        let p = plans.last().unwrap();
        assert_eq!(
            (p.dtype, p.m, p.n, p.k, p.ldc),
            (T::DTYPE, out, tokens, inf, ldy),
            "{label}"
        );
        assert!(
            p.candidates >= 1 && p.chosen < p.candidates,
            "{label}: {p:?}"
        );
        assert_eq!(p.tuned, tokens <= TUNE_MAX_TOKENS, "{label}: {p:?}");
        if p.tuned {
            let best = p.best_us.unwrap();
            assert!(p.tried >= 1 && best > 0.0, "{label}: {p:?}");
            assert_eq!(p.candidate_us.len(), p.candidates, "{label}");
            assert_eq!(p.candidate_us[p.chosen], Some(best), "{label}");
            if let Some(first) = p.heuristic_first_us {
                assert!(best <= first, "{label}: {p:?}");
            }
        }
        eprintln!(
            "{label}: {} candidates, {} ran, chosen #{} {:?}, best {:?} µs vs heuristic first {:?} µs",
            p.candidates, p.tried, p.chosen, p.config, p.best_us, p.heuristic_first_us
        );

        // Second call, same shape: the cached plan, bit-identical output.
        stream.memcpy_htod(&nan_y, &mut dy).unwrap();
        lt.linear(
            &gpu,
            &mut dy.slice_mut(..),
            ldy,
            &dx.slice(..),
            &dw.slice(..),
            tokens,
            inf,
            out,
        )
        .unwrap_or_else(|e| panic!("{label} (second call): {e}"));
        let again: Vec<T> = stream.clone_dtoh(&dy).unwrap();
        assert_eq!(
            lt.plans().len(),
            i + 1,
            "{label}: second call made a new plan"
        );
        assert_eq!(lt.plans().last(), Some(p), "{label}: plan changed");
        let differ = got
            .iter()
            .zip(&again)
            .filter(|(a, b)| a.to_bits_u32() != b.to_bits_u32())
            .count();
        assert_eq!(
            differ, 0,
            "{label}: second call differs in {differ} elements"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lt_linear_matches_reference_bf16() {
    run_dtype::<bf16>(0xb16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lt_linear_matches_reference_f16() {
    run_dtype::<f16>(0xf16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lt_linear_matches_reference_f32() {
    run_dtype::<f32>(0xf32);
}

/// More than TUNE_MAX_TOKENS: the heuristic's first, untuned, still correct.
#[test]
#[ignore = "needs a CUDA GPU"]
fn large_token_counts_take_the_heuristic_first() {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut lt = LtLinear::new(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let (tokens, inf, out) = (TUNE_MAX_TOKENS + 1, 256, 128);
    let mut rng = Rng(7);
    let x: Vec<bf16> = rng.values(tokens * inf);
    let w: Vec<bf16> = rng.values(out * inf);
    let (want, scale) = reference(&x, &w, tokens, inf, out);
    let (dx, dw) = (
        stream.clone_htod(&x).unwrap(),
        stream.clone_htod(&w).unwrap(),
    );
    let sentinel = bf16::from_f64(f64::NAN);
    let mut dy = stream.clone_htod(&vec![sentinel; tokens * out]).unwrap();
    lt.linear(
        &gpu,
        &mut dy.slice_mut(..),
        out,
        &dx.slice(..),
        &dw.slice(..),
        tokens,
        inf,
        out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<bf16> = stream.clone_dtoh(&dy).unwrap();
    check(
        &got,
        &want,
        &scale,
        tokens,
        out,
        out,
        sentinel,
        "bf16 untuned",
    );
    let p = &lt.plans()[0];
    assert!(!p.tuned && p.chosen == 0 && p.best_us.is_none(), "{p:?}");
}

/// Under graph capture a shape never seen is refused with an error that
/// says what to do, and the capture stays valid (measured: creating a plan
/// under capture invalidates it). After one eager call has tuned the shape,
/// a capture reuses that plan and its replay gives the right output.
#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_capture_needs_an_eager_call_first_then_replays_the_tuned_plan() {
    use kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut lt = LtLinear::new(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let (tokens, inf, out) = (16, 896, 1152);
    let mut rng = Rng(11);
    let x: Vec<f16> = rng.values(tokens * inf);
    let w: Vec<f16> = rng.values(out * inf);
    let (want, scale) = reference(&x, &w, tokens, inf, out);
    let (dx, dw) = (
        stream.clone_htod(&x).unwrap(),
        stream.clone_htod(&w).unwrap(),
    );
    let sentinel = f16::from_f64(f64::NAN);
    let mut dy = stream.clone_htod(&vec![sentinel; tokens * out]).unwrap();
    gpu.synchronize().unwrap();
    let call = |lt: &mut LtLinear, dy: &mut kernels::cudarc::driver::CudaSlice<f16>| {
        lt.linear(
            &gpu,
            &mut dy.slice_mut(..),
            out,
            &dx.slice(..),
            &dw.slice(..),
            tokens,
            inf,
            out,
        )
    };

    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let refused = call(&mut lt, &mut dy);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .expect("the capture is still valid");
    let err = refused
        .expect_err("an unseen shape under capture")
        .to_string();
    assert!(err.contains("outside capture first"), "{err}");
    assert!(lt.plans().is_empty());
    drop(graph);

    call(&mut lt, &mut dy).unwrap_or_else(|e| panic!("eager: {e}"));
    let got: Vec<f16> = stream.clone_dtoh(&dy).unwrap();
    check(&got, &want, &scale, tokens, out, out, sentinel, "f16 eager");
    let plans = lt.plans();
    assert_eq!(plans.len(), 1);
    assert!(
        plans[0].tuned && plans[0].best_us.is_some(),
        "{:?}",
        plans[0]
    );

    let mut dy2 = stream.clone_htod(&vec![sentinel; tokens * out]).unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = call(&mut lt, &mut dy2);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    captured.unwrap_or_else(|e| panic!("under capture with a plan: {e}"));
    assert_eq!(lt.plans(), plans, "capture reused the tuned plan");
    graph.expect("a graph").launch().unwrap();
    let got2: Vec<f16> = stream.clone_dtoh(&dy2).unwrap();
    check(
        &got2,
        &want,
        &scale,
        tokens,
        out,
        out,
        sentinel,
        "f16 graph",
    );
    assert_eq!(
        got2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "replay bit-identical to the eager call"
    );
}

/// Wrong lengths are `KernelError::Shape` naming the argument, not a panic,
/// and create no plan. (Needs a GPU only to build the buffers; the check
/// itself runs before any GPU work and is unit-tested in `linear_lt.rs`.)
#[test]
#[ignore = "needs a CUDA GPU"]
fn wrong_lengths_are_errors() {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut lt = LtLinear::new(&gpu).unwrap_or_else(|e| panic!("{e}"));
    let (tokens, inf, out) = (4, 64, 32);
    let x = stream.alloc_zeros::<bf16>(tokens * inf).unwrap();
    let w = stream.alloc_zeros::<bf16>(out * inf).unwrap();
    let mut y = stream.alloc_zeros::<bf16>(tokens * out).unwrap();
    let cases: [(usize, usize, usize, usize, usize, &str); 5] = [
        // (x_len, w_len, y_len, ldy, in, arg)
        (
            tokens * inf - 1,
            out * inf,
            tokens * out,
            out,
            inf,
            "x [tokens, in]",
        ),
        (
            tokens * inf,
            out * inf - 1,
            tokens * out,
            out,
            inf,
            "w [out, in]",
        ),
        (tokens * inf, out * inf, tokens * out - 1, out, inf, "y"),
        (tokens * inf, out * inf, tokens * out, out - 1, inf, "y"),
        (tokens * inf, out * inf, tokens * out, out, 0, "in"),
    ];
    for (xl, wl, yl, ldy, in_f, arg) in cases {
        let r = lt.linear(
            &gpu,
            &mut y.slice_mut(..yl),
            ldy,
            &x.slice(..xl),
            &w.slice(..wl),
            tokens,
            in_f,
            out,
        );
        match r {
            Err(KernelError::Shape { op, arg: a, .. }) => assert_eq!((op, a), ("linear_lt", arg)),
            other => panic!("{arg}: expected a Shape error, got {other:?}"),
        }
    }
    assert!(lt.plans().is_empty());
}
