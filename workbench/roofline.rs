//! `workbench roofline`: every perf case checked against its reference, then
//! timed through the one timing path ([`kernels::timing`]), against the
//! ceilings measured on the same card in the same run, with peers' CSVs
//! (benches/peers/) merged in. Writes roofline.csv, ceilings.csv, SETUP.md,
//! roofline.md and the plots.

use crate::case::Case;
use crate::ceilings::Ceilings;
use crate::op::{Op, Sabotage};
use crate::registry;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::timing::{rotation_sets, time_launches, TimingOpts};
use kernels::{DType, Gpu};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Input sets are capped so small cases don't allocate without bound.
const MAX_SETS: usize = 64;

/// One row of roofline.csv (the schema peers write too).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PerfRow {
    pub kernel: String,
    pub variant: String,
    pub case: String,
    pub dtype: String,
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Median µs per call; "FAIL" when the case failed its check.
    pub us: String,
    pub bytes: u64,
    pub flops: u64,
    pub gb_per_s: String,
    pub tflop_per_s: String,
    pub pct_of_ceiling: String,
    #[serde(skip)]
    pub spread: Option<(f64, f64)>,
}

impl PerfRow {
    pub fn us(&self) -> Option<f64> {
        self.us
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v > 0.0)
    }

    /// Fill the derived columns from `us` and the ceilings.
    pub fn derive(&mut self, c: &Ceilings) {
        if let Some(us) = self.us() {
            let gbs = self.bytes as f64 / us / 1e3;
            let tfs = self.flops as f64 / us / 1e6;
            self.gb_per_s = format!("{gbs:.1}");
            self.tflop_per_s = format!("{tfs:.4}");
            // Share of the roofline bound at this intensity.
            let pct = (gbs / c.gb_per_s).max(tfs / c.tflop_per_s) * 100.0;
            self.pct_of_ceiling = format!("{pct:.1}");
        }
    }
}

/// One (kernel, variant, case) of ours: checked, then timed.
pub struct Job {
    pub op: &'static dyn Op,
    pub variant: &'static str,
    pub case: Case,
    pub dtype: DType,
}

pub fn plan(kernels: &[String], dtype: DType) -> anyhow::Result<Vec<Job>> {
    let ops: Vec<&'static dyn Op> = if kernels.is_empty() || kernels.iter().any(|k| k == "all") {
        registry::OPS.to_vec()
    } else {
        kernels
            .iter()
            .map(|k| {
                registry::find(k).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown kernel `{k}` (known: {}; or `all`)",
                        registry::names().join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let mut jobs = Vec::new();
    for op in ops {
        for v in op.variants() {
            for case in op.perf_cases() {
                jobs.push(Job {
                    op,
                    variant: v.name,
                    case,
                    dtype,
                });
            }
        }
    }
    Ok(jobs)
}

/// The cases as JSON for the peer scripts: same case strings, same byte model.
/// Returns how many distinct cases were written.
pub fn emit_cases(jobs: &[Job], l2_bytes: u64, path: &Path) -> anyhow::Result<usize> {
    let mut seen = std::collections::HashSet::new();
    let cases: Vec<serde_json::Value> = jobs
        .iter()
        .filter(|j| seen.insert((j.op.name(), j.case.to_string())))
        .map(|j| -> anyhow::Result<serde_json::Value> {
            let params: BTreeMap<&str, &str> = j
                .case
                .keys()
                .map(|k| (k, j.case.get(k).unwrap_or("")))
                .collect();
            Ok(serde_json::json!({
                "kernel": j.op.name(),
                "case": j.case.to_string(),
                "dtype": j.dtype.to_string(),
                "params": params,
                "bytes": j.op.bytes_moved(&j.case, j.dtype)?,
                "flops": j.op.flops(&j.case)?,
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let n = cases.len();
    let doc = serde_json::json!({ "l2_bytes": l2_bytes, "cases": cases });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(n)
}

/// Check each job, then time it. A failed check gives a FAIL row, never a time.
/// `on_row` sees each row as soon as it is measured (the caller saves it).
pub fn run(
    gpu: &Gpu,
    jobs: &[Job],
    ceilings: &Ceilings,
    opts: TimingOpts,
    mut on_row: impl FnMut(&PerfRow) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<PerfRow>> {
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let l2 = gpu.info().l2_bytes.max(0) as u64;
    let mut rows = Vec::new();
    for j in jobs {
        bar.set_message(format!("{} {}", j.op.name(), j.case));
        let bytes = j.op.bytes_moved(&j.case, j.dtype)?;
        let mut row = PerfRow {
            kernel: j.op.name().into(),
            variant: j.variant.into(),
            case: j.case.to_string(),
            dtype: j.dtype.to_string(),
            implementation: "ours".into(),
            us: "FAIL".into(),
            bytes,
            flops: j.op.flops(&j.case)?,
            gb_per_s: String::new(),
            tflop_per_s: String::new(),
            pct_of_ceiling: String::new(),
            spread: None,
        };
        let m =
            j.op.run(gpu, &j.case, j.dtype, j.variant, Sabotage::None)
                .with_context(|| format!("checking {} {}", j.op.name(), j.case))?;
        if m.pass() {
            let sets = rotation_sets(bytes, l2, MAX_SETS);
            let mut bench = j.op.bench(gpu, &j.case, j.dtype, j.variant, sets)?;
            let t = time_launches(gpu, sets, |s| bench.launch(gpu, s), opts)
                .with_context(|| format!("timing {} {}", j.op.name(), j.case))?;
            row.us = format!("{:.3}", t.median_us);
            row.spread = Some((t.p10_us, t.p90_us));
            row.derive(ceilings);
        }
        let line = format!(
            "{:<16} {:<4} {:<60} {:>10} us {:>8} GB/s {:>6}%",
            row.kernel, row.variant, row.case, row.us, row.gb_per_s, row.pct_of_ceiling
        );
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
        on_row(&row)?;
        rows.push(row);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// Everything one roofline run measured, saved as `run.json` beside its
/// report, so `workbench roofline --render DIR` can rebuild roofline.md, the
/// plots and the summary without a GPU (after a variant becomes production,
/// say). The numbers are never re-derived from anything but this record.
#[derive(Serialize, Deserialize)]
pub struct RunRecord {
    pub provenance: crate::report::Provenance,
    pub command: String,
    /// Clocks and bus width for SETUP.md.
    pub setup_extra: Vec<(String, String)>,
    pub ceilings: Ceilings,
    pub ours: Vec<PerfRow>,
    /// p10–p90 of each row of `ours`, in order (roofline.csv has no column for it).
    spreads: Vec<Option<(f64, f64)>>,
    pub peers: Vec<PerfRow>,
    pub missing: crate::roofline_report::Missing,
}

impl RunRecord {
    pub fn new(
        provenance: crate::report::Provenance,
        command: String,
        setup_extra: Vec<(String, String)>,
        ceilings: Ceilings,
        ours: Vec<PerfRow>,
        peers: Vec<PerfRow>,
        missing: crate::roofline_report::Missing,
    ) -> Self {
        let spreads = ours.iter().map(|r| r.spread).collect();
        RunRecord {
            provenance,
            command,
            setup_extra,
            ceilings,
            ours,
            spreads,
            peers,
            missing,
        }
    }

    /// One more of our rows, with its spread.
    pub fn push(&mut self, row: PerfRow) {
        self.spreads.push(row.spread);
        self.ours.push(row);
    }

    /// Written beside `path` and renamed over it, so a run killed mid-write
    /// leaves the previous record, not half of one.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {} (a directory written by `workbench roofline` holds run.json)",
                path.display()
            )
        })?;
        let mut r: RunRecord = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a roofline run record", path.display()))?;
        anyhow::ensure!(
            r.spreads.len() == r.ours.len(),
            "{}: {} spreads for {} rows of ours",
            path.display(),
            r.spreads.len(),
            r.ours.len()
        );
        for (row, s) in r.ours.iter_mut().zip(&r.spreads) {
            row.spread = *s;
        }
        Ok(r)
    }
}

/// Read peers' CSVs (same schema) and derive their columns with our ceilings.
pub fn read_peers(
    paths: &[std::path::PathBuf],
    ceilings: &Ceilings,
) -> anyhow::Result<Vec<PerfRow>> {
    let mut rows = Vec::new();
    for p in paths {
        let mut r = csv::Reader::from_path(p)
            .with_context(|| format!("reading peers file {}", p.display()))?;
        for rec in r.deserialize::<PerfRow>() {
            let mut row = rec.with_context(|| {
                format!(
                    "{}: a row does not match the roofline.csv schema",
                    p.display()
                )
            })?;
            row.derive(ceilings);
            rows.push(row);
        }
    }
    Ok(rows)
}

pub fn write_csv(rows: &[PerfRow], path: &Path) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

pub fn write_ceilings(c: &Ceilings, path: &Path) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for r in &c.rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

/// One kernel's comparison in one case: ours against every peer.
pub struct Verdict<'a> {
    pub ours: &'a PerfRow,
    pub peers: Vec<&'a PerfRow>,
}

impl Verdict<'_> {
    pub fn fastest_peer(&self) -> Option<&PerfRow> {
        self.peers
            .iter()
            .copied()
            .filter(|p| p.us().is_some())
            .min_by(|a, b| {
                a.us()
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.us().unwrap_or(f64::MAX))
            })
    }

    /// "faster", "tie" (the peer's median inside our p10-p90), "slower", or "FAIL".
    pub fn outcome(&self) -> &'static str {
        let Some(ours) = self.ours.us() else {
            return "FAIL";
        };
        let Some(peer) = self.fastest_peer().and_then(|p| p.us()) else {
            return "no peer";
        };
        let (lo, hi) = self.ours.spread.unwrap_or((ours, ours));
        if peer >= lo && peer <= hi {
            "tie"
        } else if ours < peer {
            "faster"
        } else {
            "slower"
        }
    }
}

/// Group peer rows under our rows by (kernel, case, dtype).
pub fn verdicts<'a>(ours: &'a [PerfRow], peers: &'a [PerfRow]) -> Vec<Verdict<'a>> {
    ours.iter()
        .map(|o| Verdict {
            ours: o,
            peers: peers
                .iter()
                .filter(|p| p.kernel == o.kernel && p.case == o.case && p.dtype == o.dtype)
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceilings::Ceilings;

    fn row(implementation: &str, us: &str) -> PerfRow {
        PerfRow {
            kernel: "rmsnorm".into(),
            variant: "v1".into(),
            case: "tokens=1,hidden=896,residual=1".into(),
            dtype: "bf16".into(),
            implementation: implementation.into(),
            us: us.into(),
            bytes: 3_000_000,
            flops: 1000,
            gb_per_s: String::new(),
            tflop_per_s: String::new(),
            pct_of_ceiling: String::new(),
            spread: None,
        }
    }

    /// 3000 GB/s and 800 TFLOP/s, no measurement rows.
    fn test_ceilings() -> Ceilings {
        Ceilings {
            gb_per_s: 3000.0,
            tflop_per_s: 800.0,
            rows: vec![],
        }
    }

    #[test]
    fn run_record_round_trips_with_spreads() {
        let c = test_ceilings();
        let mut ours = row("ours", "1.000");
        ours.spread = Some((0.95, 1.05));
        let prov = crate::report::Provenance {
            gpu: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: "9.0".into(),
            arch: "sm_90a".into(),
            sm_count: 132,
            l2_mib: 50.0,
            memory_gib: 79.0,
            cuda_driver: "13.0".into(),
            date_utc: "2026-11-26 08:00 UTC".into(),
            workbench: "0.1.0".into(),
        };
        let missing = vec![(
            "rope_kv_store".into(),
            "flashinfer".into(),
            "no fused op".into(),
        )];
        let rec = RunRecord::new(
            prov,
            "workbench roofline".into(),
            vec![("SM clock (max)".into(), "1980 MHz".into())],
            c,
            vec![ours],
            vec![row("flashinfer", "1.02")],
            missing,
        );
        let mut rec = rec;
        rec.push(row("ours", "FAIL"));
        let dir = std::env::temp_dir().join(format!("wb-run-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.json");
        rec.save(&path).unwrap();
        let back = RunRecord::load(&path).unwrap();
        assert_eq!(back.ours.len(), 2);
        assert_eq!(back.ours[0].spread, Some((0.95, 1.05)));
        assert_eq!(back.ours[1].spread, None);
        assert_eq!(back.peers[0].us, "1.02");
        assert_eq!(back.provenance.date_utc, "2026-11-26 08:00 UTC");
        assert_eq!(back.missing[0].1, "flashinfer");
        // A record whose spreads do not match its rows is refused.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["spreads"] = serde_json::json!([]);
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(RunRecord::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn derive_and_verdicts() {
        let c = test_ceilings();
        let mut ours = row("ours", "1.000");
        ours.derive(&c);
        assert_eq!(ours.gb_per_s, "3000.0");
        assert_eq!(ours.pct_of_ceiling, "100.0");
        ours.spread = Some((0.95, 1.05));
        let peers = vec![row("flashinfer", "1.02"), row("torch_eager", "5")];
        let v = verdicts(std::slice::from_ref(&ours), &peers);
        assert_eq!(v[0].fastest_peer().unwrap().implementation, "flashinfer");
        assert_eq!(v[0].outcome(), "tie");
        let peers = vec![row("flashinfer", "1.2")];
        assert_eq!(
            verdicts(std::slice::from_ref(&ours), &peers)[0].outcome(),
            "faster"
        );
        let failed = row("ours", "FAIL");
        assert_eq!(
            verdicts(std::slice::from_ref(&failed), &peers)[0].outcome(),
            "FAIL"
        );
    }

    #[test]
    fn peers_csv_round_trips_in_the_schema() {
        let dir = std::env::temp_dir().join(format!("wb-roofline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("peers.csv");
        write_csv(&[row("flashinfer", "2.5")], &p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with(
            "kernel,variant,case,dtype,impl,us,bytes,flops,gb_per_s,tflop_per_s,pct_of_ceiling"
        ));
        let c = test_ceilings();
        let back = read_peers(&[p], &c).unwrap();
        assert_eq!(back[0].us(), Some(2.5));
        assert_eq!(back[0].gb_per_s, "1200.0");
        let _ = std::fs::remove_dir_all(dir);
    }
}
