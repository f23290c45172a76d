//! What `check` writes: the terminal summary, `check.csv` (one row per
//! kernel x case x dtype) and a JSON file with every detail and the device.

use crate::check::{Kind, Row};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, Color, Table};
use kernels::DeviceInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The card, driver and date every report carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Provenance {
    pub gpu: String,
    pub compute_capability: String,
    pub arch: String,
    pub sm_count: i32,
    pub l2_mib: f64,
    pub memory_gib: f64,
    pub cuda_driver: String,
    pub date_utc: String,
    pub workbench: String,
}

impl Provenance {
    pub fn new(d: &DeviceInfo) -> Self {
        Provenance {
            gpu: d.name.clone(),
            compute_capability: format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
            arch: d.arch.clone(),
            sm_count: d.sm_count,
            l2_mib: d.l2_bytes as f64 / (1 << 20) as f64,
            memory_gib: d.total_mem_bytes as f64 / (1u64 << 30) as f64,
            cuda_driver: format!(
                "{}.{}",
                d.driver_version / 1000,
                (d.driver_version % 1000) / 10
            ),
            date_utc: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            workbench: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} (cc {}, {}, {} SMs, {:.0} MiB L2, {:.0} GiB), CUDA driver {}, {}",
            self.gpu,
            self.compute_capability,
            self.arch,
            self.sm_count,
            self.l2_mib,
            self.memory_gib,
            self.cuda_driver,
            self.date_utc
        )
    }
}

/// The CSV row, in the column order the issue fixes.
#[derive(Serialize)]
struct CsvRow<'a> {
    kernel: &'a str,
    case: String,
    dtype: String,
    max_abs: String,
    max_rel: String,
    rel_l2: String,
    nan: usize,
    tol_used: String,
    pass: bool,
}

fn sci(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3e}")
    } else {
        x.to_string()
    }
}

pub fn write_csv(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut w = csv::Writer::from_path(path)?;
    for r in rows {
        let m = &r.metrics;
        w.serialize(CsvRow {
            kernel: r.job.op.name(),
            case: r.job.case_string(),
            dtype: r.job.dtype.to_string(),
            max_abs: sci(m.max_abs),
            max_rel: sci(m.max_rel),
            rel_l2: sci(m.rel_l2),
            nan: m.nan,
            tol_used: format!("{:.3}", m.tol_used),
            pass: r.pass(),
        })?;
    }
    w.flush()?;
    Ok(())
}

#[derive(Serialize)]
struct JsonRow<'a> {
    kernel: &'a str,
    variant: &'a str,
    case: String,
    dtype: String,
    kind: Kind,
    pass: bool,
    seconds: f64,
    replay: String,
    tolerance: crate::compare::Tolerance,
    metrics: &'a crate::compare::Metrics,
}

pub fn write_json(rows: &[Row], prov: &Provenance, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let rows: Vec<JsonRow> = rows
        .iter()
        .map(|r| JsonRow {
            kernel: r.job.op.name(),
            variant: r.job.variant,
            case: r.job.case_string(),
            dtype: r.job.dtype.to_string(),
            kind: r.job.kind,
            pass: r.pass(),
            seconds: r.seconds,
            replay: r.job.replay(),
            tolerance: r.job.op.tolerance(r.job.dtype),
            metrics: &r.metrics,
        })
        .collect();
    let doc = serde_json::json!({ "device": prov, "rows": rows });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

/// Per kernel x variant x dtype: cases, failures, the worst share of the
/// tolerance and the worst ‖Δ‖/‖ref‖.
pub fn summary_table(rows: &[Row]) -> Table {
    #[derive(Default)]
    struct Agg {
        cases: usize,
        failed: usize,
        tol_used: f64,
        rel_l2: f64,
        max_abs: f64,
    }
    let mut groups: BTreeMap<(usize, &str, &str, String), Agg> = BTreeMap::new();
    let order: Vec<&str> = crate::registry::names();
    for r in rows {
        let name = r.job.op.name();
        let idx = order.iter().position(|n| *n == name).unwrap_or(usize::MAX);
        let a = groups
            .entry((idx, name, r.job.variant, r.job.dtype.to_string()))
            .or_default();
        a.cases += 1;
        a.failed += usize::from(!r.pass());
        a.tol_used = a.tol_used.max(r.metrics.tol_used);
        a.rel_l2 = a.rel_l2.max(r.metrics.rel_l2);
        a.max_abs = a.max_abs.max(r.metrics.max_abs);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "kernel",
        "variant",
        "dtype",
        "cases",
        "failed",
        "worst max_abs",
        "worst rel_l2",
        "worst tol_used",
        "result",
    ]);
    for ((_, name, variant, dtype), a) in groups {
        let ok = a.failed == 0;
        t.add_row(vec![
            Cell::new(name),
            Cell::new(variant),
            Cell::new(dtype),
            Cell::new(a.cases),
            Cell::new(a.failed),
            Cell::new(sci(a.max_abs)),
            Cell::new(sci(a.rel_l2)),
            Cell::new(format!("{:.3}", a.tol_used)),
            Cell::new(if ok { "PASS" } else { "FAIL" }).fg(if ok {
                Color::Green
            } else {
                Color::Red
            }),
        ]);
    }
    t
}

/// Detail lines for failed rows (at most `limit`), each with its replay command.
pub fn failures(rows: &[Row], limit: usize) -> Vec<String> {
    rows.iter()
        .filter(|r| !r.pass())
        .take(limit)
        .map(|r| {
            format!(
                "FAIL {}\n     {}\n     replay: {}",
                r.job.op.name(),
                r.metrics.failure_summary(),
                r.job.replay()
            )
        })
        .collect()
}
