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
