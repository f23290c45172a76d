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
    /// Run the whole engine on a fixed request set and report its throughput.
    E2e(E2eArgs),
    /// Generate text from a checkpoint with its tokenizer, streaming to stdout.
    Generate(GenerateArgs),
    /// Greedy parity with HF transformers on a golden from benches/peers/hf_parity.py.
    Parity(ParityArgs),
}

#[derive(clap::Args)]
struct E2eArgs {
    /// A preset (qwen2-0.5b, qwen2-1.5b, qwen2-7b: random weights made on the
    /// GPU), a checkpoint directory, or a hub id in the local HF cache.
    #[arg(long, default_value = "qwen2-0.5b")]
    model: String,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Use only the first N requests of the workload.
    #[arg(long)]
    num_seqs: Option<usize>,
    /// Cap every prompt at this many tokens (the workload's own lengths otherwise).
    #[arg(long)]
    max_input_len: Option<usize>,
    /// Cap every output at this many tokens.
    #[arg(long)]
    max_output_len: Option<usize>,
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 512)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 16384)]
    max_batched_tokens: usize,
    #[arg(long, default_value_t = 4096)]
    max_model_len: usize,
    /// Force the KV pool size in blocks of 16 tokens (default: from free memory).
    #[arg(long)]
    num_blocks: Option<usize>,
    /// CSV to append the result row to (default: reports/<gpu>/e2e.csv).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Cap on tokens per split of decode attention (0: the kernel's own plan,
    /// the fastest measured: caps of 1024 and 512 cost 5% and 18% of decode
    /// attention time on the default workload, CHALLENGES #12).
    #[arg(long, default_value_t = 0)]
    decode_split_tokens: usize,
    /// Run decode with the separate qkv_rope_kv_store launch before attention
    /// (the path before v3f; bit-identical results, one launch more per layer).
    #[arg(long)]
    unfused_decode_qkv: bool,
    /// The paged_attention variant decode runs (A/B runs; default: production).
    #[arg(long, default_value = kernels::paged_attention::PRODUCTION,
          value_parser = clap::builder::PossibleValuesParser::new(kernels::paged_attention::VARIANTS))]
    decode_attention: String,
    /// The prefill_attention variant prefill runs (A/B runs; default: production).
    #[arg(long, default_value = kernels::prefill_attention::PRODUCTION,
          value_parser = clap::builder::PossibleValuesParser::new(kernels::prefill_attention::VARIANTS))]
    prefill_attention: String,
    /// Launch every kernel of a decode step eagerly (no CUDA graphs).
    #[arg(long)]
    eager: bool,
    /// Launch rmsnorm, silu_mul, the gathers and decode attention with
    /// programmatic dependent launch (sm_90+; bit-identical results; 1%
    /// slower on the H100, CHALLENGES #20).
    #[arg(long)]
    pdl: bool,
    /// Split decode's o_proj and down GEMMs K this many ways (one
    /// strided-batched cuBLAS GEMM into f32 partials, summed by the next add
    /// + RMSNorm; 0 or 1: off).
    #[arg(long, default_value_t = workbench::engine::runner::DEFAULT_SPLIT_K)]
    split_k: usize,
    /// GEMM path of the linear layers: cublas (cublasGemmEx, the default) or
    /// lt-tuned (cuBLASLt, the fastest of its candidates timed once per
    /// decode shape: measured no faster per step, and its tuning and
    /// per-shape plans slow a whole run, CHALLENGES #13).
    #[arg(long, default_value = "cublas")]
    gemm: workbench::engine::model::GemmBackend,
    /// Do not write the CSV row.
    #[arg(long)]
    no_csv: bool,
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(clap::Args)]
struct ParityArgs {
    /// The checkpoint directory hf_parity.py saved (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Its golden.json (default: golden.json in the model directory).
    #[arg(long)]
    golden: Option<PathBuf>,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// CSV for the per-prompt results (default: reports/<gpu>/parity.csv).
    #[arg(long)]
    csv: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A checkpoint directory (config.json, *.safetensors, tokenizer.json) or a
    /// hub id in the local HF cache; presets have no tokenizer.
    #[arg(long)]
    model: String,
    /// The prompt (read from stdin when absent).
    prompt: Option<String>,
    /// System message for the chat template (default: the template's own).
    #[arg(long)]
    system: Option<String>,
    /// Encode the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Default: generation_config.json's if it sets do_sample, else 0 (greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Default: generation_config.json's if it sets do_sample, else 1 (off).
    #[arg(long)]
    top_p: Option<f32>,
    /// Default: generation_config.json's if it sets do_sample, else 0 (off).
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past EOS tokens, up to --max-tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Prompt plus output tokens (capped at the model's max_position_embeddings).
    #[arg(long, default_value_t = 4096)]
    max_model_len: usize,
    /// Launch every kernel eagerly (no CUDA graphs).
    #[arg(long)]
    eager: bool,
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(clap::Args)]
struct RooflineArgs {
    /// Kernels to time (default: all).
    kernels: Vec<String>,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Only these variants of each kernel: names, `production`, `latest`,
    /// comma-separated (default: all, so the report shows the path).
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
    /// Rebuild the report of an earlier run from DIR/run.json and exit (no
    /// GPU; writes into --out, default DIR). Production marks follow the
    /// current registry; the numbers are the run's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernels", "variant", "peers", "peers_missing", "emit_cases"])]
    render: Option<PathBuf>,
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
    /// Only these variants: names, `production`, `latest`, comma-separated.
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
        Cmd::E2e(a) => e2e_cmd(a),
        Cmd::Generate(a) => generate_cmd(a),
        Cmd::Parity(a) => parity_cmd(a),
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
/// What `--split-k` does to this model: which of o_proj and down split,
/// and why not where they cannot (`kernels::linear::split_k_supported`).
fn split_k_note(cfg: &workbench::engine::config::Qwen2Config, dtype: DType, s: usize) -> String {
    if s < 2 {
        return String::new();
    }
    let ok = |k: usize| match dtype {
        DType::BF16 => kernels::linear::split_k_supported::<half::bf16>(k, s),
        DType::F16 => kernels::linear::split_k_supported::<half::f16>(k, s),
        DType::F32 => false,
    };
    let o_k = cfg.num_attention_heads * cfg.head_dim;
    let d_k = cfg.intermediate_size;
    let split: Vec<&str> = [("o_proj", o_k), ("down", d_k)]
        .iter()
        .filter(|(_, k)| ok(*k))
        .map(|(n, _)| *n)
        .collect();
    let not = |n: &str, k: usize| format!("{n} (K = {k})");
    let unsplit: Vec<String> = [("o_proj", o_k), ("down", d_k)]
        .iter()
        .filter(|(_, k)| !ok(*k))
        .map(|(n, k)| not(n, *k))
        .collect();
    let mut note = String::new();
    if !split.is_empty() {
        note += &format!(" ({} split {s} ways along K)", split.join(" and "));
    }
    if !unsplit.is_empty() {
        note += &format!(
            " (--split-k {s} not applied to {}: needs bf16 or f16 and K / {s} a multiple of 8)",
            unsplit.join(" or ")
        );
    }
    note
}

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
    if let Some(dir) = &a.render {
        let mut rec = roofline::RunRecord::load(&dir.join("run.json"))?;
        // The report says it was rebuilt, and by what (its "Produced by" line
        // wraps the command in backticks).
        rec.command = format!(
            "{}`; report rebuilt from its run.json on {} by `{}",
            rec.command,
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        return render_roofline(&rec, a.out.as_deref().unwrap_or(dir));
    }
    let jobs: Vec<_> = roofline::plan(&a.kernels, a.dtype)?
        .into_iter()
        .filter(|j| {
            workbench::registry::select_variants(j.op, a.variant.as_deref()).contains(&j.variant)
        })
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
    // run.json is rewritten after every case, so a run cut short (a device
    // time limit) still leaves the cases it finished for `--render`.
    let run_json = out.join("run.json");
    let mut record =
        roofline::RunRecord::new(prov, command, extra, c.clone(), vec![], peers, missing);
    record.save(&run_json)?;
    roofline::run(
        &gpu,
        &jobs,
        &c,
        kernels::timing::TimingOpts::default(),
        |row| {
            record.push(row.clone());
            record.save(&run_json)
        },
    )?;
    render_roofline(&record, &out)
}

/// Write a roofline run's report into `out`: roofline.csv, ceilings.csv,
/// SETUP.md, roofline.md, the plots, and the summary table on stdout.
/// Exit code 1 when any case failed its check.
fn render_roofline(
    rec: &workbench::roofline::RunRecord,
    out: &std::path::Path,
) -> Result<ExitCode, Setup> {
    use workbench::{roofline, roofline_report};
    let (prov, c, ours, peers) = (&rec.provenance, &rec.ceilings, &rec.ours, &rec.peers);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut all = ours.clone();
    all.extend(peers.iter().cloned());
    roofline::write_csv(&all, &out.join("roofline.csv"))?;
    roofline::write_ceilings(c, &out.join("ceilings.csv"))?;
    std::fs::write(
        out.join("SETUP.md"),
        roofline_report::setup(prov, c, &rec.setup_extra, &rec.command),
    )?;
    std::fs::write(
        out.join("roofline.md"),
        roofline_report::markdown(ours, peers, &rec.missing, c, prov, &rec.command),
    )?;
    let title = format!("{}, {}", prov.gpu, prov.date_utc);
    let plots = roofline_report::plots(ours, peers, c, &title, out)?;

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
    let vs = roofline::verdicts(ours, peers);
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in ours {
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

/// The `'static` entry of `list` equal to `v` (clap has already checked
/// that `v` is one of them), else `default`.
fn listed(list: &'static [&'static str], v: &str, default: &'static str) -> &'static str {
    list.iter().find(|x| **x == v).copied().unwrap_or(default)
}

fn e2e_cmd(a: E2eArgs) -> Result<ExitCode, Setup> {
    use workbench::engine::weights::Checkpoint;
    use workbench::engine::{config::Qwen2Config, hub, model::WeightSource, runner::EngineConfig};
    let source = hub::resolve_model(&a.model)?;
    let (cfg, ckpt) = match source.dir() {
        None => (Qwen2Config::preset(&a.model)?, None),
        Some(dir) => {
            let cfg = Qwen2Config::from_file(&dir.join("config.json"))?;
            let ck = Checkpoint::open(dir, &cfg)?;
            (cfg, Some(ck))
        }
    };
    if !(a.gpu_memory_utilization > 0.0 && a.gpu_memory_utilization <= 1.0) {
        return Err(Setup(anyhow::anyhow!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            a.gpu_memory_utilization
        )));
    }
    if a.max_num_seqs == 0 || a.max_num_seqs > a.max_batched_tokens {
        return Err(Setup(anyhow::anyhow!(
            "--max-num-seqs {} must be at least 1 and at most --max-batched-tokens {}",
            a.max_num_seqs,
            a.max_batched_tokens
        )));
    }
    let mut requests = workbench::workload::nanovllm_256()?;
    if let Some(n) = a.num_seqs {
        if n == 0 || n > requests.len() {
            return Err(Setup(anyhow::anyhow!(
                "--num-seqs {n}: the workload has {} requests (use 1..={})",
                requests.len(),
                requests.len()
            )));
        }
        requests.truncate(n);
    }
    for r in &mut requests {
        if let Some(m) = a.max_input_len {
            r.prompt.truncate(m.max(1));
        }
        if let Some(m) = a.max_output_len {
            r.max_tokens = r.max_tokens.min(m.max(1));
        }
    }
    let gpu = Gpu::new(a.device)?;
    let prov = Provenance::new(gpu.info());
    println!("{}", prov.line());
    let ec = EngineConfig {
        max_num_seqs: a.max_num_seqs,
        max_batched_tokens: a.max_batched_tokens,
        max_model_len: a.max_model_len,
        gpu_memory_utilization: a.gpu_memory_utilization,
        num_blocks: a.num_blocks,
        cuda_graphs: !a.eager,
        decode_split_tokens: a.decode_split_tokens,
        fused_decode_qkv: !a.unfused_decode_qkv,
        decode_attention: listed(
            kernels::paged_attention::VARIANTS,
            &a.decode_attention,
            kernels::paged_attention::PRODUCTION,
        ),
        prefill_attention: listed(
            kernels::prefill_attention::VARIANTS,
            &a.prefill_attention,
            kernels::prefill_attention::PRODUCTION,
        ),
        gemm: a.gemm,
        pdl: a.pdl,
        split_k: a.split_k,
    };
    let get = |name: &str| ckpt.as_ref().and_then(|c| c.tensor_f32(name).ok());
    let src = match &ckpt {
        None => WeightSource::Random { seed: a.seed },
        Some(c) => {
            if c.dtype() != a.dtype {
                println!(
                    "converting the checkpoint's {} weights to {}",
                    c.dtype(),
                    a.dtype
                );
            }
            WeightSource::Tensors(&get)
        }
    };
    let workload =
        if a.num_seqs.is_some() || a.max_input_len.is_some() || a.max_output_len.is_some() {
            format!("nanovllm-256[{} seqs]", requests.len())
        } else {
            "nanovllm-256".to_string()
        };
    let spec = workbench::e2e::E2eSpec {
        engine_name: "workbench",
        model_name: &a.model,
        workload_name: &workload,
        temperature: a.temperature,
        seed: a.seed,
    };
    println!(
        "{}: {} requests, {} prompt tokens, {} output tokens, temperature {}, ignore_eos",
        workload,
        requests.len(),
        requests.iter().map(|r| r.prompt.len()).sum::<usize>(),
        requests.iter().map(|r| r.max_tokens).sum::<usize>(),
        a.temperature
    );
    println!(
        "decode path: paged_attention {}{}, {}, GEMMs {}{}, {}",
        ec.decode_attention,
        if ec.fused_decode_qkv {
            " with the fused q|k|v prologue"
        } else {
            " after qkv_rope_kv_store"
        },
        if ec.pdl && gpu.info().compute_capability.0 >= 9 {
            "programmatic dependent launch on"
        } else {
            "programmatic dependent launch off"
        },
        format!("{:?}", ec.gemm).to_lowercase(),
        split_k_note(&cfg, a.dtype, ec.split_k),
        if ec.cuda_graphs {
            "CUDA graphs"
        } else {
            "eager"
        },
    );
    // The kernel the variant runs at this model's head dim (v8 falls back to
    // v7's at head dim 128, and every wgmma variant to mma.sync off sm_90a).
    let prefill_kernel = kernels::prefill_attention::kernel_on(
        &gpu,
        ec.prefill_attention,
        cfg.head_dim,
        workbench::engine::model::BLOCK_SIZE,
    )
    .map(|k| format!("{}'s kernel", k.name))
    .unwrap_or_else(|e| e.to_string());
    println!(
        "prefill path: prefill_attention {} (head_dim {}: {})",
        ec.prefill_attention, cfg.head_dim, prefill_kernel
    );
    // The floor's ceilings, measured before the engine takes the card's
    // memory (as `roofline` measures them): measured after the run, the
    // memcpy ceiling came out 5% lower on the H100 and flattered the ratio.
    let c = workbench::ceilings::measure(&gpu)?;
    gpu.synchronize()?;
    let res = match a.dtype {
        DType::BF16 => {
            workbench::e2e::run::<half::bf16>(&gpu, &cfg, src, ec, &requests, &spec, true)?
        }
        DType::F16 => {
            workbench::e2e::run::<half::f16>(&gpu, &cfg, src, ec, &requests, &spec, true)?
        }
        DType::F32 => workbench::e2e::run::<f32>(&gpu, &cfg, src, ec, &requests, &spec, true)?,
    };
    let r = &res.row;
    println!(
        "{} {} {}: {} seqs, {:.2} s, {:.0} output tok/s, {:.0} total tok/s (prefill {:.0}, decode {:.0} tok/s), \
         TTFT p50/p99 {:.0}/{:.0} ms, TPOT p50/p99 {:.2}/{:.2} ms, peak GPU memory {:.0} MiB, \
         {} steps, {} preemptions, {} KV blocks",
        r.engine, r.model, a.dtype, r.num_seqs, r.seconds, r.output_tok_per_s, r.total_tok_per_s,
        res.prefill_tok_per_s, res.decode_tok_per_s, r.ttft_p50_ms, res.ttft_p99_ms,
        r.tpot_p50_ms, res.tpot_p99_ms, res.peak_gpu_mib, res.steps, res.preemptions, res.num_blocks
    );
    let csv_path = a.csv.clone().unwrap_or_else(|| {
        PathBuf::from("reports")
            .join(gpu_dir(&gpu.info().name))
            .join("e2e.csv")
    });
    if let Some((n, mean_s, ctx)) = &res.full_decode {
        let floor = workbench::engine::floor::decode_step_floor(
            &cfg,
            a.dtype.size_bytes(),
            ctx,
            c.gb_per_s,
            c.tflop_per_s,
        );
        println!(
            "decode step at batch {}: {:.3} ms mean over {n} steps in the run (scheduling and \
             sampling included); roofline floor {:.3} ms ({:.1} MB at {:.0} GB/s, {:.2} TFLOP at \
             {:.0} TFLOP/s)",
            ctx.len(),
            mean_s * 1e3,
            floor.seconds * 1e3,
            floor.bytes / 1e6,
            c.gb_per_s,
            floor.flops / 1e12,
            c.tflop_per_s
        );
        if let Some(t) = workbench::e2e::gemm_plans_table(&res.gemm_plans, ctx.len()) {
            println!(
                "cuBLASLt GEMM picks at batch {} (timed once, inputs hot in L2):\n{t}",
                ctx.len()
            );
        }
        if let Some(bd) = &res.breakdown {
            // Appended like e2e.csv, so runs of several models sit together.
            let bpath = csv_path.with_file_name("e2e-breakdown.csv");
            let model = format!("{} {}", a.model, a.dtype);
            let t = workbench::e2e::breakdown_report(bd, floor.seconds * 1e6, &model, &bpath)?;
            println!(
                "decode step at batch {} by op (CUDA events between ops, medians of 20 steps):\n{t}",
                bd.batch
            );
        }
    }
    if !a.no_csv {
        workbench::e2e::append_csv(r, &csv_path)?;
        println!("appended to {}", csv_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn parity_cmd(a: ParityArgs) -> Result<ExitCode, Setup> {
    use workbench::engine::{config::Qwen2Config, weights::Checkpoint};
    use workbench::parity;
    let golden_path = a
        .golden
        .clone()
        .unwrap_or_else(|| a.model.join("golden.json"));
    let text = std::fs::read_to_string(&golden_path).with_context(|| {
        format!(
            "reading {} (make it with benches/peers/hf_parity.py)",
            golden_path.display()
        )
    })?;
    let golden = parity::Golden::from_json(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", golden_path.display()))?;
    let cfg = Qwen2Config::from_file(&a.model.join("config.json"))?;
    let ckpt = Checkpoint::open(&a.model, &cfg)?;
    let gpu = Gpu::new(a.device)?;
    println!("{}", Provenance::new(gpu.info()).line());
    println!(
        "golden: {} ({}, top {}), {} prompts; ours in {}{}",
        golden.model,
        golden.dtype,
        golden.top_k,
        golden.cases.len(),
        a.dtype,
        if ckpt.dtype() != a.dtype {
            format!(" (converted from the checkpoint's {})", ckpt.dtype())
        } else {
            String::new()
        }
    );
    let get = |name: &str| ckpt.tensor_f32(name).ok();
    let ours = match a.dtype {
        DType::BF16 => parity::generate_ours::<half::bf16>(&gpu, &cfg, &get, &golden)?,
        DType::F16 => parity::generate_ours::<half::f16>(&gpu, &cfg, &get, &golden)?,
        DType::F32 => parity::generate_ours::<f32>(&gpu, &cfg, &get, &golden)?,
    };
    let name = a.model.display().to_string();
    let rows = parity::rows(&golden, &ours, &name, &a.dtype.to_string());
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "prompt",
        "tokens",
        "same before divergence",
        "ours in HF top-k",
        "HF's in our top-k",
        "max |Δ logprob| (matched)",
        "result",
    ]);
    let rank = |r: Option<usize>, diverged: bool| match (r, diverged) {
        (_, false) => "-".to_string(),
        (Some(i), true) => format!("#{}", i + 1),
        (None, true) => "no".to_string(),
    };
    for r in &rows {
        let diverged = r.matched < r.steps;
        t.add_row(vec![
            r.prompt_len.to_string(),
            r.steps.to_string(),
            format!("{}/{}", r.matched, r.steps),
            rank(r.ours_in_hf, diverged),
            rank(r.hf_in_ours, diverged),
            format!("{:.4}", r.max_logprob_diff),
            if r.pass { "pass" } else { "FAIL" }.to_string(),
        ]);
    }
    println!("{t}");
    let csv_path = a.csv.clone().unwrap_or_else(|| {
        PathBuf::from("reports")
            .join(gpu_dir(&gpu.info().name))
            .join("parity.csv")
    });
    if let Some(dir) = csv_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut w = csv::Writer::from_path(&csv_path)
        .with_context(|| format!("writing {}", csv_path.display()))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let failed = rows.iter().filter(|r| !r.pass).count();
    println!(
        "{} of {} prompts pass vLLM's rule (at the first divergence each token in the other's \
         top {}); wrote {}",
        rows.len() - failed,
        rows.len(),
        golden.top_k,
        csv_path.display()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `generate`: everything the user gave is checked before the GPU is touched;
/// the logic lives in `workbench::generate`.
fn generate_cmd(a: GenerateArgs) -> Result<ExitCode, Setup> {
    use std::io::{IsTerminal, Write};
    use workbench::engine::weights::Checkpoint;
    use workbench::engine::{config::Qwen2Config, hub, model::WeightSource, scheduler::Request};
    use workbench::generate::{self as g, GenerateError, PromptMode};
    let source = hub::resolve_model(&a.model)?;
    let dir = source.dir().ok_or_else(|| GenerateError::Preset {
        name: a.model.clone(),
    })?;
    let tok = g::ChatTokenizer::from_dir(dir)?;
    let cfg = Qwen2Config::from_file(&dir.join("config.json"))?;
    if a.raw && a.system.is_some() {
        return Err(GenerateError::SystemWithRaw.into());
    }
    if a.prompt.is_none() && std::io::stdin().is_terminal() {
        eprintln!("reading the prompt from stdin (end it with Ctrl-D)");
    }
    let text = g::read_prompt(a.prompt, &mut std::io::stdin().lock())?;
    let mode = if a.raw {
        PromptMode::Raw
    } else {
        PromptMode::Chat { system: a.system }
    };
    let sampling = g::SamplingArgs {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        max_tokens: a.max_tokens,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
    };
    let req = Request {
        id: 0,
        prompt: tok.prompt_ids(&text, &mode)?,
        params: g::sampling_params(&sampling, &tok.generation)?,
        eos: tok.eos_ids_with(&cfg.eos_token_ids),
    };
    let ec = g::engine_config(&cfg, a.max_model_len, a.gpu_memory_utilization, !a.eager)?;
    g::validate_request(&cfg, &ec, &req)?;
    let ckpt = Checkpoint::open(dir, &cfg)?;
    for note in tok.notes() {
        eprintln!("note: {note}");
    }
    let gpu = Gpu::new(a.device)?;
    eprintln!("{}", Provenance::new(gpu.info()).line());
    let get = |name: &str| ckpt.tensor_f32(name).ok();
    let src = WeightSource::Tensors(&get);
    let mut out = std::io::stdout().lock();
    let mut ends_in_newline = true;
    let on_text = |piece: &str| {
        ends_in_newline = piece.ends_with('\n');
        out.write_all(piece.as_bytes())?;
        out.flush()
    };
    let res = match a.dtype {
        DType::BF16 => g::run_generate::<half::bf16>(&gpu, &cfg, src, ec, &tok, req, on_text),
        DType::F16 => g::run_generate::<half::f16>(&gpu, &cfg, src, ec, &tok, req, on_text),
        DType::F32 => g::run_generate::<f32>(&gpu, &cfg, src, ec, &tok, req, on_text),
    };
    let stats = match res {
        // The reader went away (`| head`): nothing more to say to it.
        Err(GenerateError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS)
        }
        r => r?,
    };
    if !ends_in_newline && std::io::stderr().is_terminal() {
        eprintln!();
    }
    eprintln!("{}", stats.line());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_note_says_what_splits_and_what_cannot() {
        let cfg = workbench::engine::config::Qwen2Config::preset("qwen2-0.5b").unwrap();
        assert_eq!(split_k_note(&cfg, DType::BF16, 0), "");
        assert_eq!(
            split_k_note(&cfg, DType::BF16, 2),
            " (o_proj and down split 2 ways along K)"
        );
        // 896 / 3 is not whole: nothing splits, and the note says why.
        let n = split_k_note(&cfg, DType::BF16, 3);
        assert!(
            n.contains("not applied to o_proj (K = 896) or down (K = 4864)"),
            "{n}"
        );
        assert!(split_k_note(&cfg, DType::F32, 2).contains("needs bf16 or f16"));
    }
}
