//! Split-K through f32 partials (`linear::linear_split_k`) and the add +
//! RMSNorm that sums them (`rmsnorm::fused_add_rmsnorm_partials`), against
//! f64 CPU references on random inputs in [-1, 1) rounded to the storage
//! type.
//!
//! - Each partial p[s] = x[:, s·kc..(s+1)·kc] · w[:, s·kc..]^T is f32 from
//!   f32 accumulation: |Δ| <= 1e-5 · Σ|x·w| + 1e-6.
//! - The norm is checked from the GPU's own partials, so it isolates the
//!   kernel: x = round(Σ_s p[s]), residual' = round(x + residual), out =
//!   residual' · rsqrt(mean(residual'^2) + eps) · weight, rounded once
//!   (`rounded_once` tolerances). The reference sums the partials and adds
//!   the residual as the kernel promises to (in f32, in split order), and
//!   rounds correctly (`DType::round`; CHALLENGES #22), so x and residual'
//!   must come out the same values.
//! - A NaN in one partial makes that residual element and its whole output
//!   row NaN, and no other row's.
//! - Repeated calls are bit-identical.
//!
//! GPU tests are ignored here; `.gpu/run-tests` runs them.

mod common;

use common::{reference, rounded_once, Rng, ACC_RTOL};
use half::{bf16, f16};
use kernels::rmsnorm::RmsNormDims;
use kernels::{Gpu, Storage};

fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| panic!("{e}"))
}

/// (tokens, in, out, splits): the Qwen2-0.5B o_proj and down at decode
/// sizes, the 1.5B down, and a small odd token count.
const SHAPES: [(usize, usize, usize, usize); 4] = [
    (256, 896, 896, 4),
    (256, 4864, 896, 4),
    (64, 8960, 1536, 8),
    (3, 128, 64, 2),
];

/// Count of elements outside `atol + rtol·|ref|` (NaN counts), and ‖Δ‖/‖ref‖.
fn compare(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> (usize, f64, String) {
    let (mut bad, mut first) = (0, String::new());
    let (mut e2, mut r2) = (0.0, 0.0);
    for (i, (g, r)) in got.iter().zip(want).enumerate() {
        let d = (g - r).abs();
        if d.is_nan() || d > atol + rtol * r.abs() {
            if bad == 0 {
                first = format!("[{i}] got {g} want {r}");
            }
            bad += 1;
        }
        e2 += d * d;
        r2 += r * r;
    }
    (bad, (e2 / r2).sqrt(), first)
}

fn run_dtype<T: Storage>(seed: u64) {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut rng = Rng(seed);
    let tol = rounded_once(T::DTYPE);
    for &(tokens, inf, out, splits) in &SHAPES {
        let label = format!(
            "{} tokens={tokens} in={inf} out={out} splits={splits}",
            T::DTYPE
        );
        assert!(
            kernels::linear::split_k_supported::<T>(inf, splits),
            "{label}"
        );
        let kc = inf / splits;
        let x: Vec<T> = rng.values(tokens * inf);
        let w: Vec<T> = rng.values(out * inf);
        let dx = stream.clone_htod(&x).unwrap();
        let dw = stream.clone_htod(&w).unwrap();
        let mut dp = stream
            .clone_htod(&vec![f32::NAN; splits * tokens * out])
            .unwrap();
        kernels::linear::linear_split_k(
            &gpu,
            &mut dp.slice_mut(..),
            &dx.slice(..),
            &dw.slice(..),
            tokens,
            inf,
            out,
            splits,
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let p: Vec<f32> = stream.clone_dtoh(&dp).unwrap();
        // Each split against the f64 product of its own K slice.
        for s in 0..splits {
            let xs: Vec<T> = (0..tokens)
                .flat_map(|t| x[t * inf + s * kc..t * inf + (s + 1) * kc].to_vec())
                .collect();
            let ws: Vec<T> = (0..out)
                .flat_map(|o| w[o * inf + s * kc..o * inf + (s + 1) * kc].to_vec())
                .collect();
            let (want, mag) = reference(&xs, &ws, tokens, kc, out);
            let part = &p[s * tokens * out..(s + 1) * tokens * out];
            let bad = part
                .iter()
                .zip(want.iter().zip(&mag))
                .filter(|(g, (r, m))| {
                    let d = (**g as f64 - **r).abs();
                    d.is_nan() || d > 1e-6 + ACC_RTOL * **m
                })
                .count();
            assert_eq!(
                bad, 0,
                "{label}: split {s}: {bad} partial sums out of tolerance"
            );
        }

        // The add + RMSNorm over those partials.
        let res: Vec<T> = rng.values(tokens * out);
        let weight: Vec<T> = (0..out)
            .map(|_| T::from_f64(1.0 + 0.1 * rng.uniform()))
            .collect();
        let eps = 1e-6f32;
        let d = RmsNormDims {
            tokens,
            hidden: out,
            eps,
        };
        let mut dres = stream.clone_htod(&res).unwrap();
        let dwt = stream.clone_htod(&weight).unwrap();
        let mut dout = stream
            .clone_htod(&vec![T::from_f64(f64::NAN); tokens * out])
            .unwrap();
        // Residual reset to `res`, then the norm over `partials`: (residual', out).
        let mut norm = |partials: &cudarc::driver::CudaSlice<f32>| -> (Vec<T>, Vec<T>) {
            stream.memcpy_htod(&res, &mut dres).unwrap();
            kernels::rmsnorm::fused_add_rmsnorm_partials(
                &gpu,
                &mut dout.slice_mut(..),
                &mut dres.slice_mut(..),
                &partials.slice(..),
                splits,
                &dwt.slice(..),
                d,
            )
            .unwrap_or_else(|e| panic!("{label}: {e}"));
            (
                stream.clone_dtoh(&dres).unwrap(),
                stream.clone_dtoh(&dout).unwrap(),
            )
        };
        let (res1, out1) = norm(&dp);
        let got_res: Vec<f64> = res1.iter().map(|v| v.to_f64()).collect();
        let got_out: Vec<f64> = out1.iter().map(|v| v.to_f64()).collect();
        let (mut want_res, mut want_out) = (vec![0.0; tokens * out], vec![0.0; tokens * out]);
        for t in 0..tokens {
            let mut ss = 0.0;
            for o in 0..out {
                // The kernel's contract: an f32 sum in split order.
                let xs = (1..splits).fold(p[t * out + o], |acc, s| {
                    acc + p[s * tokens * out + t * out + o]
                });
                // round(x) + residual in f32, rounded once, as the kernel.
                let x = T::DTYPE.round(xs as f64) as f32;
                let r = T::DTYPE.round((x + res[t * out + o].to_f64() as f32) as f64);
                want_res[t * out + o] = r;
                ss += r * r;
            }
            let rstd = 1.0 / (ss / out as f64 + eps as f64).sqrt();
            for o in 0..out {
                want_out[t * out + o] = want_res[t * out + o] * rstd * weight[o].to_f64();
            }
        }
        // The residual is exact (same operations, same roundings); out is
        // rounded once from f32 math.
        for (what, got, want, atol, rtol) in [
            ("residual", &got_res, &want_res, 0.0, 0.0),
            ("out", &got_out, &want_out, tol.atol, tol.rtol),
        ] {
            let (bad, rel, first) = compare(got, want, atol, rtol);
            assert_eq!(
                bad, 0,
                "{label}: {what}: {bad} out of tolerance, first {first}"
            );
            assert!(rel <= tol.rel_l2, "{label}: {what}: ‖Δ‖/‖ref‖ {rel:.3e}");
            eprintln!("{label}: {what} ok, ‖Δ‖/‖ref‖ {rel:.2e}");
        }

        // Again from the same partials and residual: bit-identical.
        let (res2, out2) = norm(&dp);
        let same = |x: &[T], y: &[T]| {
            x.iter()
                .zip(y)
                .all(|(a, b)| a.to_bits_u32() == b.to_bits_u32())
        };
        assert!(
            same(&res1, &res2) && same(&out1, &out2),
            "{label}: a repeated call differs"
        );

        // A NaN in the last split's partial of row t0: that row is NaN.
        let t0 = tokens / 2;
        let mut pn = p.clone();
        pn[(splits - 1) * tokens * out + t0 * out + out / 3] = f32::NAN;
        let (rn, o) = norm(&stream.clone_htod(&pn).unwrap());
        assert!(
            rn[t0 * out + out / 3].to_f64().is_nan()
                && o[t0 * out..(t0 + 1) * out]
                    .iter()
                    .all(|v| v.to_f64().is_nan()),
            "{label}: a NaN partial must make its row's residual element and output NaN"
        );
        let other = if t0 == 0 { 1.min(tokens - 1) } else { 0 };
        if other != t0 {
            assert!(
                o[other * out..(other + 1) * out]
                    .iter()
                    .all(|v| v.to_f64().is_finite()),
                "{label}: the NaN leaked into row {other}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn split_k_partials_and_their_norm_match_the_reference_bf16() {
    run_dtype::<bf16>(0x5b16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn split_k_partials_and_their_norm_match_the_reference_f16() {
    run_dtype::<f16>(0x5f16);
}

#[test]
fn split_k_refuses_shapes_it_cannot_split() {
    assert!(!kernels::linear::split_k_supported::<f32>(896, 4));
    assert!(!kernels::linear::split_k_supported::<bf16>(896, 1));
    assert!(!kernels::linear::split_k_supported::<bf16>(900, 4)); // 225 per split
    assert!(!kernels::linear::split_k_supported::<bf16>(896, 3));
    assert!(kernels::linear::split_k_supported::<bf16>(896, 4));
}
