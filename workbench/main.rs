//! `workbench`: check LLM inference kernels against CPU references on the GPU.
//!
//! Exit codes: 0 all pass, 1 a numerical mismatch, 2 a setup, input or
//! driver error (one line on stderr saying what is wrong and how to fix it).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use kernels::{DType, Gpu};
use std::path::PathBuf;
use std::process::ExitCode;
use workbench::check::{self, Selection};
use workbench::op::Sabotage;
use workbench::registry;
use workbench::report::{self, Provenance};

#[derive(Parser)]
#[command(
    name = "workbench",
    version,
    about = "Write, prove and measure LLM inference kernels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List kernels, their variants, dtypes and case counts.
    List,
    /// Show the GPU the workbench would use.
    Info {
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Run kernels against their CPU references (every check and perf case, every dtype).
    Check(CheckArgs),
    /// Check, then time every perf case against the measured ceilings and peers.
    Roofline(RooflineArgs),
}

#[derive(clap::Args)]
struct RooflineArgs {
    /// Kernels to time (default: all).
    kernels: Vec<String>,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Only this variant of each kernel (default: all, so the report shows the path).
    #[arg(long)]
    variant: Option<String>,
    /// Report directory (default: reports/<gpu>, e.g. reports/h100).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Peers' CSVs in the roofline.csv schema (benches/peers/run_peers.py).
    #[arg(long, num_args = 1..)]
    peers: Vec<PathBuf>,
    /// Peers' missing.csv (kernel,impl,reason): ops a peer lacks.
    #[arg(long)]
    peers_missing: Option<PathBuf>,
    /// Write the perf cases as JSON for the peer scripts and exit (no GPU needed).
    #[arg(long)]
    emit_cases: Option<PathBuf>,
    /// L2 size written into --emit-cases (bytes; H100: 50 MiB).
    #[arg(long, default_value_t = 50 << 20)]
    l2_bytes: u64,
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Only {
    Checks,
    Perf,
}

#[derive(Clone, Copy, ValueEnum)]
enum SabotageArg {
    SkipLaunch,
    OneRowFewer,
    ShiftBlockTable,
    WritePastEnd,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// A kernel name (see `workbench list`) or `all`.
    kernel: String,
    /// Replay one case, e.g. 'tokens=7,hidden=1025,residual=1,gen=randn,seed=1,dtype=bf16'.
    #[arg(long)]
    case: Option<String>,
    /// Only these dtypes (comma-separated: bf16,f16,f32).
    #[arg(long, value_delimiter = ',')]
    dtype: Vec<DType>,
    /// Only this variant.
    #[arg(long)]
    variant: Option<String>,
    /// Only the check cases or only the perf cases.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Write one row per kernel x case x dtype.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write every detail (mismatch indices, tolerances, device) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Sabotage every launch to see the checker catch it.
    #[arg(long, value_enum, hide = true)]
    sabotage: Option<SabotageArg>,
}

/// Errors that end the run with exit code 2.
struct Setup(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Setup {
    fn from(e: E) -> Self {
        Setup(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Setup(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Setup> {
    match cli.cmd {
        Cmd::List => {
            list();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info { device } => {
            let gpu = Gpu::new(device)?;
            println!("{}", Provenance::new(gpu.info()).line());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check(a) => check_cmd(a),
        Cmd::Roofline(a) => roofline_cmd(a),
    }
}

fn list() {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "kernel",
        "variants",
        "dtypes",
        "check cases",
        "perf cases",
        "what",
    ]);
    for op in registry::OPS {
        let variants: Vec<String> = op
            .variants()
            .iter()
            .map(|v| {
                format!(
                    "{}{}: {}",
                    v.name,
                    if v.production { " (production)" } else { "" },
                    v.note
                )
            })
            .collect();
        let dtypes: Vec<String> = op.dtypes().iter().map(|d| d.to_string()).collect();
        t.add_row(vec![
            op.name().to_string(),
            variants.join("\n"),
            dtypes.join(","),
            op.check_cases().len().to_string(),
            op.perf_cases().len().to_string(),
            op.about().to_string(),
        ]);
    }
    println!("{t}");
}

fn check_cmd(a: CheckArgs) -> Result<ExitCode, Setup> {
    let sel = Selection {
        kernel: a.kernel.clone(),
        case: a.case.clone(),
        dtypes: a.dtype.clone(),
        variant: a.variant.clone(),
        checks: a.only != Some(Only::Perf),
        perf: a.only != Some(Only::Checks),
    };
    // Everything the user typed is validated before the GPU is touched.
    let jobs = check::plan(&sel)?;
    let sabotage = match a.sabotage {
        None => Sabotage::None,
        Some(SabotageArg::SkipLaunch) => Sabotage::SkipLaunch,
        Some(SabotageArg::OneRowFewer) => Sabotage::OneRowFewer,
        Some(SabotageArg::ShiftBlockTable) => Sabotage::ShiftBlockTable,
        Some(SabotageArg::WritePastEnd) => Sabotage::WritePastEnd,
    };
    let gpu = Gpu::new(a.device)?;
    let prov = Provenance::new(gpu.info());
    println!("{}", prov.line());
    gpu.warm_up_modules()?;
    println!(
        "checking {} jobs ({} {})",
        jobs.len(),
        a.kernel,
        a.case.as_deref().unwrap_or("all cases")
    );

    let rows = check::run(&gpu, &jobs, sabotage, true)?;
    if let Some(p) = &a.csv {
        report::write_csv(&rows, p).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.json {
        report::write_json(&rows, &prov, p).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{}", report::summary_table(&rows));
    let failed = rows.iter().filter(|r| !r.pass()).count();
    for line in report::failures(&rows, 20) {
        println!("{line}");
    }
    let secs: f64 = rows.iter().map(|r| r.seconds).sum();
    println!(
        "{} of {} passed in {secs:.1} s",
        rows.len() - failed,
        rows.len()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// reports/<gpu>: "h100", "h200", else the device name in lowercase.
fn gpu_dir(name: &str) -> String {
    for short in ["H100", "H200", "A100", "B200", "L40S"] {
        if name.contains(short) {
            return short.to_lowercase();
        }
    }
    name.to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn roofline_cmd(a: RooflineArgs) -> Result<ExitCode, Setup> {
    use workbench::{ceilings, roofline, roofline_report};
    let jobs: Vec<_> = roofline::plan(&a.kernels, a.dtype)?
        .into_iter()
        .filter(|j| a.variant.as_deref().is_none_or(|v| j.variant == v))
        .collect();
    if jobs.is_empty() {
        return Err(Setup(anyhow::anyhow!(
            "no perf cases selected (variant {:?}; see `workbench list`)",
            a.variant
        )));
    }
    if let Some(p) = &a.emit_cases {
        let n = roofline::emit_cases(&jobs, a.l2_bytes, p)?;
        println!("wrote {n} cases to {}", p.display());
        return Ok(ExitCode::SUCCESS);
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let gpu = Gpu::new(a.device)?;
    let prov = Provenance::new(gpu.info());
    println!("{}", prov.line());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(gpu_dir(&gpu.info().name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    gpu.warm_up_modules()?;

    println!("measuring ceilings...");
    let c = ceilings::measure(&gpu)?;
    for r in &c.rows {
        println!(
            "  {:<32} {:>9.1} {:<8} {}",
            r.name, r.value, r.unit, r.source
        );
    }
    let peers = roofline::read_peers(&a.peers, &c)?;
    let missing: roofline_report::Missing = match &a.peers_missing {
        None => Vec::new(),
        Some(p) => {
            let mut r =
                csv::Reader::from_path(p).with_context(|| format!("reading {}", p.display()))?;
            r.deserialize::<(String, String, String)>()
                .collect::<Result<_, _>>()?
        }
    };
    println!(
        "checking and timing {} cases of ours ({}), {} peer rows merged",
        jobs.len(),
        a.dtype,
        peers.len()
    );
    let ours = roofline::run(&gpu, &jobs, &c, kernels::timing::TimingOpts::default())?;

    let mut all = ours.clone();
    all.extend(peers.iter().cloned());
    roofline::write_csv(&all, &out.join("roofline.csv"))?;
    roofline::write_ceilings(&c, &out.join("ceilings.csv"))?;
    let ctx = gpu.context();
    let attr = |x| ctx.attribute(x).unwrap_or(0);
    use kernels::cudarc::driver::sys::CUdevice_attribute as A;
    let extra = vec![
        (
            "SM clock (max)".to_string(),
            format!("{} MHz", attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE) / 1000),
        ),
        (
            "memory clock (max)".to_string(),
            format!(
                "{} MHz",
                attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE) / 1000
            ),
        ),
        (
            "memory bus".to_string(),
            format!(
                "{} bits",
                attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
            ),
        ),
    ];
    std::fs::write(
        out.join("SETUP.md"),
        roofline_report::setup(&prov, &c, &extra, &command),
    )?;
    std::fs::write(
        out.join("roofline.md"),
        roofline_report::markdown(&ours, &peers, &missing, &c, &prov, &command),
    )?;
    let title = format!("{}, {}", prov.gpu, prov.date_utc);
    let plots = roofline_report::plots(&ours, &peers, &c, &title, &out)?;

    // Summary: per kernel, how many cases, % of ceiling range, and the verdicts.
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "kernel",
        "variant",
        "cases",
        "FAIL",
        "% ceiling (min–max)",
        "faster",
        "tie",
        "slower",
        "no peer",
    ]);
    let vs = roofline::verdicts(&ours, &peers);
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in &ours {
        let k = (r.kernel.clone(), r.variant.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut failed = 0;
    for (k, v) in &keys {
        let rows: Vec<_> = vs
            .iter()
            .filter(|x| &x.ours.kernel == k && &x.ours.variant == v)
            .collect();
        let pct: Vec<f64> = rows
            .iter()
            .filter_map(|x| x.ours.pct_of_ceiling.parse().ok())
            .collect();
        let count = |o: &str| rows.iter().filter(|x| x.outcome() == o).count();
        failed += count("FAIL");
        let (lo, hi) = pct
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), &p| (a.min(p), b.max(p)));
        t.add_row(vec![
            k.clone(),
            v.clone(),
            rows.len().to_string(),
            count("FAIL").to_string(),
            if pct.is_empty() {
                "—".into()
            } else {
                format!("{lo:.0}–{hi:.0}")
            },
            count("faster").to_string(),
            count("tie").to_string(),
            count("slower").to_string(),
            count("no peer").to_string(),
        ]);
    }
    println!("{t}");
    println!(
        "wrote {}/{{roofline.csv, ceilings.csv, SETUP.md, roofline.md}} and {} plots (svg+png)",
        out.display(),
        plots.len()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
