//! `workbench check`: plan the (kernel, variant, case, dtype) jobs a
//! selection asks for, run each on the GPU against its reference, and collect
//! one row per job.

use crate::case::{Case, CaseError};
use crate::compare::Metrics;
use crate::op::{Op, Sabotage};
use crate::registry;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::{DType, Gpu};
use serde::Serialize;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Check,
    Perf,
    /// Given on the command line with --case.
    Replay,
}

#[derive(Clone)]
pub struct Job {
    pub op: &'static dyn Op,
    pub variant: &'static str,
    pub case: Case,
    pub dtype: DType,
    pub kind: Kind,
}

impl Job {
    /// The case as `check.csv` and `--case` spell it: the kernel's keys, with
    /// `variant=` first when the kernel has more than one.
    pub fn case_string(&self) -> String {
        if self.op.variants().len() > 1 {
            format!("variant={},{}", self.variant, self.case)
        } else {
            self.case.to_string()
        }
    }

    /// The command that replays exactly this job.
    pub fn replay(&self) -> String {
        format!(
            "workbench check {} --case '{},dtype={}'",
            self.op.name(),
            self.case_string(),
            self.dtype
        )
    }
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("unknown kernel `{0}` (known: {known}; or `all`)", known = registry::names().join(", "))]
    UnknownKernel(String),
    #[error("--case needs one kernel, not `all`")]
    CaseNeedsKernel,
    #[error(transparent)]
    Case(#[from] CaseError),
    #[error("{kernel}: unknown variant `{variant}` (known: {known})")]
    Variant {
        kernel: &'static str,
        variant: String,
        known: String,
    },
    #[error("{kernel} has no {dtype} version")]
    Dtype { kernel: &'static str, dtype: DType },
}

#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// A kernel name or "all".
    pub kernel: String,
    /// A full case string; may carry `dtype=` and `variant=`.
    pub case: Option<String>,
    pub dtypes: Vec<DType>,
    pub variant: Option<String>,
    pub checks: bool,
    pub perf: bool,
}

fn variants_of(op: &'static dyn Op, wanted: Option<&str>) -> Result<Vec<&'static str>, PlanError> {
    let picked = registry::select_variants(op, wanted);
    if picked.is_empty() {
        let known: Vec<&str> = op.variants().iter().map(|v| v.name).collect();
        return Err(PlanError::Variant {
            kernel: op.name(),
            variant: wanted.unwrap_or_default().to_string(),
            known: format!("{}, production, latest", known.join(", ")),
        });
    }
    Ok(picked)
}

/// Every job the selection names, validated before any GPU work.
pub fn plan(sel: &Selection) -> Result<Vec<Job>, PlanError> {
    let ops: Vec<&'static dyn Op> = if sel.kernel == "all" {
        registry::OPS.to_vec()
    } else {
        vec![registry::find(&sel.kernel)
            .ok_or_else(|| PlanError::UnknownKernel(sel.kernel.clone()))?]
    };
    let mut jobs = Vec::new();
    if let Some(s) = &sel.case {
        let [op] = ops[..] else {
            return Err(PlanError::CaseNeedsKernel);
        };
        let mut case: Case = s.parse()?;
        let dtypes = match case.remove("dtype") {
            Some(d) => vec![d.parse::<DType>().map_err(|want| CaseError::Value {
                case: s.clone(),
                key: "dtype".into(),
                value: d.clone(),
                want,
            })?],
            None if sel.dtypes.is_empty() => op.dtypes().to_vec(),
            None => sel.dtypes.clone(),
        };
        let variant = case.remove("variant").or(sel.variant.clone());
        op.check_keys(&case)?;
        for variant in variants_of(op, variant.as_deref())? {
            for &dtype in &dtypes {
                if !op.dtypes().contains(&dtype) {
                    return Err(PlanError::Dtype {
                        kernel: op.name(),
                        dtype,
                    });
                }
                jobs.push(Job {
                    op,
                    variant,
                    case: case.clone(),
                    dtype,
                    kind: Kind::Replay,
                });
            }
        }
        return Ok(jobs);
    }
    for op in ops {
        let mut cases: Vec<(Case, Kind)> = Vec::new();
        if sel.checks {
            cases.extend(op.check_cases().into_iter().map(|c| (c, Kind::Check)));
        }
        if sel.perf {
            cases.extend(op.perf_cases().into_iter().map(|c| (c, Kind::Perf)));
        }
        for variant in variants_of(op, sel.variant.as_deref())? {
            for dtype in op
                .dtypes()
                .iter()
                .filter(|d| sel.dtypes.is_empty() || sel.dtypes.contains(d))
            {
                for (case, kind) in &cases {
                    jobs.push(Job {
                        op,
                        variant,
                        case: case.clone(),
                        dtype: *dtype,
                        kind: *kind,
                    });
                }
            }
        }
    }
    Ok(jobs)
}

pub struct Row {
    pub job: Job,
    pub metrics: Metrics,
    pub seconds: f64,
}

impl Row {
    pub fn pass(&self) -> bool {
        self.metrics.pass()
    }
}

/// Run every job in order. A setup or driver error stops the run (the
/// context may be unusable); a numerical mismatch is a row that fails.
pub fn run(
    gpu: &Gpu,
    jobs: &[Job],
    sabotage: Sabotage,
    show_progress: bool,
) -> anyhow::Result<Vec<Row>> {
    let bar = if show_progress {
        ProgressBar::new(jobs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::with_capacity(jobs.len());
    let mut failed = 0;
    for job in jobs {
        bar.set_message(format!(
            "{} {} {} (failed so far: {failed})",
            job.op.name(),
            job.dtype,
            job.case
        ));
        let t = std::time::Instant::now();
        let metrics = job
            .op
            .run(gpu, &job.case, job.dtype, job.variant, sabotage)
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("while running {}", job.replay()))
            })?;
        if !metrics.pass() {
            failed += 1;
        }
        if !show_progress || bar.is_hidden() {
            // Logs (CI, a GPU host's captured output): one line per job as it ends.
            eprintln!(
                "{} {} {:.2}s {}",
                if metrics.pass() { "ok  " } else { "FAIL" },
                job.dtype,
                t.elapsed().as_secs_f64(),
                job.replay()
            );
        }
        rows.push(Row {
            job: job.clone(),
            metrics,
            seconds: t.elapsed().as_secs_f64(),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(kernel: &str) -> Selection {
        Selection {
            kernel: kernel.into(),
            checks: true,
            perf: true,
            ..Default::default()
        }
    }

    #[test]
    fn all_plans_every_kernel_case_and_dtype() {
        let jobs = plan(&sel("all")).unwrap();
        for op in registry::OPS {
            let n = (op.check_cases().len() + op.perf_cases().len())
                * op.dtypes().len()
                * op.variants().len();
            assert_eq!(jobs.iter().filter(|j| j.op.name() == op.name()).count(), n);
        }
    }

    #[test]
    fn a_replayed_case_string_plans_that_one_job() {
        let jobs = plan(&sel("all")).unwrap();
        let j = &jobs[jobs.len() / 2];
        let s = j.replay();
        let case = s.split('\'').nth(1).unwrap();
        let again = plan(&Selection {
            kernel: j.op.name().into(),
            case: Some(case.into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].case, j.case);
        assert_eq!(again[0].dtype, j.dtype);
    }

    #[test]
    fn bad_selections_name_what_is_wrong() {
        let e = |s: Selection| plan(&s).err().unwrap().to_string();
        assert!(e(sel("rmsnrom")).contains("unknown kernel `rmsnrom`"));
        let mut s = sel("rmsnorm");
        s.case = Some("tokens=2,hidden=8,dtype=fp8".into());
        assert!(e(s.clone()).contains("dtype=fp8"));
        s.case = Some("tokens=2,hiden=8".into());
        assert!(e(s.clone()).contains("unknown key `hiden`"));
        s.case = Some("tokens=2,hidden=8,variant=v9".into());
        assert!(e(s).contains("unknown variant `v9`"));
    }
}
