//! Comparing a kernel's output with its f64 reference.
//!
//! Element test: `|got - ref| <= atol + rtol * |ref|`, and NaN/Inf must sit
//! exactly where the reference has them (a NaN never passes as a number).
//! Whole-tensor test: ‖got − ref‖₂ / ‖ref‖₂ <= `rel_l2`. Reported per case:
//! max abs error, max rel error (over elements with |ref| >= atol; smaller
//! ones are judged by atol), ‖Δ‖/‖ref‖, the count of unexpected NaNs, the
//! share of the tolerance used (1.0 = at the limit), and the first mismatches
//! with their indices.

use rayon::prelude::*;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
    pub rel_l2: f64,
}

impl Tolerance {
    /// Bit-exact (copies such as kv_store).
    pub const EXACT: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 0.0,
        rel_l2: 0.0,
    };
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Mismatch {
    pub tensor: String,
    /// Multi-index into the tensor's shape.
    pub index: Vec<usize>,
    pub got: f64,
    pub want: f64,
}

/// How many mismatches to keep for the report.
const KEEP: usize = 5;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    pub elements: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    pub rel_l2: f64,
    /// NaNs in the output where the reference has a number.
    pub nan: usize,
    pub mismatches: usize,
    pub tol_used: f64,
    pub first_mismatches: Vec<Mismatch>,
    /// Guard words overwritten, inputs modified, and the like.
    pub violations: Vec<String>,
    #[serde(skip)]
    sq_err: f64,
    #[serde(skip)]
    sq_ref: f64,
    /// n·atol² over the compared elements: the least ‖ref‖² that rel_l2
    /// divides by (see `finish_l2`).
    #[serde(skip)]
    sq_floor: f64,
    #[serde(skip)]
    rel_l2_limit: f64,
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            idx[d] = i % n;
            i /= n;
        }
    }
    idx
}

impl Metrics {
    /// Compare `got` with `want`, both laid out row-major in `shape`.
    pub fn compare(
        tensor: &str,
        shape: &[usize],
        got: &[f64],
        want: &[f64],
        tol: Tolerance,
    ) -> Metrics {
        Self::compare_scaled(tensor, shape, got, want, None, tol)
    }

    /// As [`Metrics::compare`], with a per-element error scale: element i may
    /// differ by `atol + rtol * max(|want_i|, scale_i)`. Ops whose output is
    /// a sum of terms that cancel (a rotation, a weighted average) pass the
    /// magnitude of those terms, since f32 rounding is relative to them, not
    /// to the small result (see CHALLENGES.md).
    pub fn compare_scaled(
        tensor: &str,
        shape: &[usize],
        got: &[f64],
        want: &[f64],
        scale: Option<&[f64]>,
        tol: Tolerance,
    ) -> Metrics {
        let mut m = Metrics {
            rel_l2_limit: tol.rel_l2,
            ..Default::default()
        };
        let scale_ok = scale.is_none_or(|s| s.len() == want.len());
        if got.len() != want.len() || shape.iter().product::<usize>() != want.len() || !scale_ok {
            m.violations.push(format!(
                "{tensor}: got {} elements, reference {} (shape {shape:?})",
                got.len(),
                want.len()
            ));
            return m;
        }
        // Chunks in parallel, merged in order (first mismatches stay first).
        const CH: usize = 1 << 16;
        let parts: Vec<Metrics> = (0..want.len().div_ceil(CH))
            .into_par_iter()
            .map(|c| {
                let r = c * CH..((c + 1) * CH).min(want.len());
                let sc = scale.map(|s| &s[r.clone()]);
                Self::compare_range(tensor, shape, r.start, &got[r.clone()], &want[r], sc, tol)
            })
            .collect();
        parts.into_iter().fold(m, Metrics::merge)
    }

    fn compare_range(
        tensor: &str,
        shape: &[usize],
        offset: usize,
        got: &[f64],
        want: &[f64],
        scale: Option<&[f64]>,
        tol: Tolerance,
    ) -> Metrics {
        let mut m = Metrics {
            rel_l2_limit: tol.rel_l2,
            elements: got.len(),
            ..Default::default()
        };
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let mag = scale.map_or(w.abs(), |s| s[i].abs().max(w.abs()));
            let bad = if w.is_nan() {
                !g.is_nan()
            } else if w.is_infinite() {
                g != w
            } else if !g.is_finite() {
                if g.is_nan() {
                    m.nan += 1;
                }
                true
            } else {
                let d = (g - w).abs();
                let allowed = tol.atol + tol.rtol * mag;
                m.max_abs = m.max_abs.max(d);
                if w.abs() >= tol.atol && w != 0.0 {
                    m.max_rel = m.max_rel.max(d / w.abs());
                }
                let used = if allowed > 0.0 {
                    d / allowed
                } else if d > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                };
                m.tol_used = m.tol_used.max(used);
                m.sq_err += d * d;
                m.sq_ref += w * w;
                m.sq_floor += tol.atol * tol.atol;
                d > allowed
            };
            if bad {
                if !w.is_finite() || !g.is_finite() {
                    m.tol_used = f64::INFINITY;
                }
                m.mismatches += 1;
                if m.first_mismatches.len() < KEEP {
                    m.first_mismatches.push(Mismatch {
                        tensor: tensor.into(),
                        index: unravel(offset + i, shape),
                        got: g,
                        want: w,
                    });
                }
            }
        }
        m.finish_l2();
        m
    }

    /// ‖Δ‖ / max(‖ref‖, √n·atol). The floor matters only where every
    /// reference value is about atol or less, e.g. SiLU outputs that
    /// underflow f16 (true value 1e-31, correctly stored as 0): there a plain
    /// ‖Δ‖/‖ref‖ is 1.0 for a right answer. A bias is still caught once it
    /// exceeds rel_l2 · atol per element.
    fn finish_l2(&mut self) {
        let denom = self.sq_ref.max(self.sq_floor);
        self.rel_l2 = if denom > 0.0 {
            (self.sq_err / denom).sqrt()
        } else {
            self.sq_err.sqrt()
        };
    }

    /// Fold another tensor's comparison into this case's totals.
    pub fn merge(mut self, o: Metrics) -> Metrics {
        self.elements += o.elements;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.max_rel = self.max_rel.max(o.max_rel);
        self.nan += o.nan;
        self.mismatches += o.mismatches;
        self.tol_used = self.tol_used.max(o.tol_used);
        let room = KEEP.saturating_sub(self.first_mismatches.len());
        self.first_mismatches
            .extend(o.first_mismatches.into_iter().take(room));
        self.violations.extend(o.violations);
        self.sq_err += o.sq_err;
        self.sq_ref += o.sq_ref;
        self.sq_floor += o.sq_floor;
        self.rel_l2_limit = self.rel_l2_limit.max(o.rel_l2_limit);
        self.finish_l2();
        self
    }

    pub fn violation(&mut self, v: impl Into<String>) {
        self.violations.push(v.into());
    }

    /// Every element within tolerance, ‖Δ‖/‖ref‖ within its limit, and no
    /// guard or input violation. An empty comparison never passes.
    pub fn pass(&self) -> bool {
        self.elements > 0
            && self.mismatches == 0
            && self.violations.is_empty()
            && self.rel_l2 <= self.rel_l2_limit
    }

    /// One line on why the case failed, for the terminal.
    pub fn failure_summary(&self) -> String {
        let mut parts = Vec::new();
        if self.elements == 0 {
            parts.push("nothing compared".to_string());
        }
        if self.mismatches > 0 {
            parts.push(format!(
                "{} of {} elements out of tolerance",
                self.mismatches, self.elements
            ));
        }
        if self.nan > 0 {
            parts.push(format!("{} unexpected NaN", self.nan));
        }
        if self.rel_l2 > self.rel_l2_limit {
            parts.push(format!(
                "rel_l2 {:.3e} > {:.1e}",
                self.rel_l2, self.rel_l2_limit
            ));
        }
        parts.extend(self.violations.iter().cloned());
        for mm in &self.first_mismatches {
            parts.push(format!(
                "{}{:?}: got {} want {}",
                mm.tensor, mm.index, mm.got, mm.want
            ));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerance = Tolerance {
        atol: 1e-2,
        rtol: 1e-2,
        rel_l2: 1e-2,
    };
    const TOL_F16: Tolerance = Tolerance {
        atol: 1e-3,
        rtol: 2e-3,
        rel_l2: 1e-3,
    };

    #[test]
    fn equal_passes_and_reports_zero() {
        let w = [1.0, -2.0, 3.5, 0.0];
        let m = Metrics::compare("out", &[2, 2], &w, &w, TOL);
        assert!(m.pass());
        assert_eq!((m.max_abs, m.rel_l2, m.tol_used, m.nan), (0.0, 0.0, 0.0, 0));
    }

    #[test]
    fn a_nan_left_by_a_skipped_row_fails_with_its_index() {
        let want = [1.0, 2.0, 3.0, 4.0];
        let got = [1.0, 2.0, f64::NAN, f64::NAN];
        let m = Metrics::compare("out", &[2, 2], &got, &want, TOL);
        assert!(!m.pass());
        assert_eq!(m.nan, 2);
        assert_eq!(m.first_mismatches[0].index, vec![1, 0]);
    }

    #[test]
    fn nan_where_reference_has_nan_passes_number_there_fails() {
        let want = [f64::NAN, 1.0];
        assert!(Metrics::compare("c", &[2], &[f64::NAN, 1.0], &want, TOL).pass());
        assert!(!Metrics::compare("c", &[2], &[0.0, 1.0], &want, TOL).pass());
    }

    #[test]
    fn tolerance_share_and_relative_error() {
        // allowed = 0.01 + 0.01 * 2 = 0.03; error 0.015 uses half of it.
        let m = Metrics::compare("o", &[1], &[2.015], &[2.0], TOL);
        assert!((m.tol_used - 0.5).abs() < 1e-9);
        assert!((m.max_rel - 0.0075).abs() < 1e-9);
        assert!(m.pass());
        let m = Metrics::compare("o", &[1], &[2.04], &[2.0], TOL);
        assert!(!m.pass());
    }

    #[test]
    fn rel_l2_limit_fails_a_uniformly_biased_output() {
        // Every element inside its elementwise tolerance, but all biased the same way.
        let want = vec![1.0; 100];
        let got = vec![1.015; 100];
        let tol = Tolerance {
            rel_l2: 1e-2,
            ..TOL
        };
        let m = Metrics::compare("o", &[100], &got, &want, tol);
        assert_eq!(m.mismatches, 0);
        assert!(!m.pass(), "rel_l2 = {}", m.rel_l2);
    }

    #[test]
    fn outputs_that_underflow_the_storage_pass_and_a_bias_there_still_fails() {
        // gpu_proptest's silu_mul case `tokens=2,inter=1,gen=large` (f16):
        // gates near -80 give true outputs near -1e-31, which f16 stores as
        // 0. Every element is within atol; ‖Δ‖/‖ref‖ alone would be 1.0.
        let want = [-1.15e-31, -2.3e-32];
        let m = Metrics::compare("o", &[2], &[0.0, 0.0], &want, TOL_F16);
        assert!(m.pass(), "rel_l2 = {}", m.rel_l2);
        // A uniform bias of a tenth of atol passes every element but not rel_l2.
        let m = Metrics::compare("o", &[2], &[1e-4, 1e-4], &want, TOL_F16);
        assert_eq!(m.mismatches, 0);
        assert!(!m.pass(), "rel_l2 = {}", m.rel_l2);
        // Bit-exact tolerances have no floor.
        let m = Metrics::compare("o", &[1], &[0.0], &[1e-31], Tolerance::EXACT);
        assert!(!m.pass());
    }

    #[test]
    fn a_scale_widens_the_bound_only_where_terms_cancel() {
        // 3e4*c - 3e4*s = 0.1: f32 rounding of the terms is ~2e-3, ten times atol.
        let (got, want, scale) = ([0.102, 3.0e4], [0.1, 3.0e4], [3.0e4, 3.0e4]);
        assert!(!Metrics::compare("q", &[2], &got, &want, TOL_F16).pass());
        assert!(Metrics::compare_scaled("q", &[2], &got, &want, Some(&scale), TOL_F16).pass());
        // Without cancellation the scale is the value itself: no change.
        let m = Metrics::compare_scaled("q", &[1], &[2.1], &[2.0], Some(&[1.0]), TOL_F16);
        assert!(!m.pass());
    }

    #[test]
    fn chunked_comparison_keeps_global_indices_and_order() {
        let n = (1 << 16) * 2 + 5;
        let want = vec![1.0; n];
        let mut got = want.clone();
        got[n - 1] = f64::NAN;
        got[(1 << 16) + 3] = 7.0;
        let m = Metrics::compare("o", &[n], &got, &want, TOL);
        assert_eq!(m.mismatches, 2);
        assert_eq!(m.first_mismatches[0].index, vec![(1 << 16) + 3]);
        assert_eq!(m.first_mismatches[1].index, vec![n - 1]);
        assert_eq!(m.elements, n);
    }

    #[test]
    fn exact_tolerance_and_merge() {
        let a = Metrics::compare("k", &[2], &[1.0, 2.0], &[1.0, 2.0], Tolerance::EXACT);
        let b = Metrics::compare("v", &[2], &[1.0, 2.0000001], &[1.0, 2.0], Tolerance::EXACT);
        assert!(a.pass() && !b.pass());
        let m = a.merge(b);
        assert!(!m.pass());
        assert_eq!(m.elements, 4);
        assert_eq!(m.first_mismatches[0].tensor, "v");
    }

    #[test]
    fn violations_and_empty_comparisons_fail() {
        let mut m = Metrics::compare("o", &[1], &[1.0], &[1.0], TOL);
        m.violation("guard after out overwritten");
        assert!(!m.pass());
        assert!(!Metrics::compare("o", &[0], &[], &[], TOL).pass());
        assert!(!Metrics::compare("o", &[2], &[1.0], &[1.0, 2.0], TOL).pass());
    }
}
