//! `workbench e2e`: the full engine on a fixed request set (nano-vllm's
//! benchmark by default), timed end to end, with one result line and a row
//! of `reports/<gpu>/e2e.csv`.
//!
//! As nano-vllm's `bench.py`: every request is queued at t = 0 after one
//! warm-up request (kernel compilation, cuBLAS handles), then the engine
//! steps until all finish. TTFT counts from t = 0 to the step that samples
//! a sequence's first token; TPOT is (finish − first token) / (outputs − 1).

use crate::engine::config::Qwen2Config;
use crate::engine::model::{StepInput, WeightSource};
use crate::engine::runner::{Engine, EngineConfig, EngineError, Finished};
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{BatchKind, Request};
use crate::workload::WorkloadRequest;
use cudarc::cublas::{CudaBlas, Gemm};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::{Gpu, KernelError, Storage};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One row of `e2e.csv` (the columns, in order).
#[derive(Clone, Debug, Serialize)]
pub struct E2eRow {
    pub engine: String,
    pub model: String,
    pub workload: String,
    pub num_seqs: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub seconds: f64,
    pub output_tok_per_s: f64,
    pub total_tok_per_s: f64,
    pub ttft_p50_ms: f64,
    pub tpot_p50_ms: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct E2eResult {
    pub row: E2eRow,
    pub prefill_tok_per_s: f64,
    pub decode_tok_per_s: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p99_ms: f64,
    pub peak_gpu_mib: f64,
    pub preemptions: usize,
    pub steps: usize,
    pub num_blocks: usize,
    /// Decode steps that ran with the full batch: (count, mean seconds,
    /// context lengths of the last such step).
    pub full_decode: Option<(usize, f64, Vec<usize>)>,
    /// One decode step at that batch and those contexts, op by op.
    pub breakdown: Option<Breakdown>,
    /// What cuBLASLt tuning chose per GEMM shape (with `--gemm lt-tuned`).
    pub gemm_plans: Vec<kernels::linear_lt::PlanInfo>,
}

/// GPU time of one decode step by op, µs per step: medians of 20 replays
/// of the step captured as a CUDA graph with an event-record node between
/// ops (as the engine runs decode), and of 20 eager runs with an event
/// between ops (those carry host launch gaps); and the unmarked step
/// replayed as a graph.
#[derive(Clone, Debug)]
pub struct Breakdown {
    pub batch: usize,
    /// (op, graph-replay µs, eager µs); graph `None` with `--eager`.
    pub ops: Vec<(&'static str, Option<f64>, f64)>,
    /// Sum of the graph column (eager when there is none).
    pub kernels_us: f64,
    /// Median of 50 replays of the captured decode graph.
    pub graph_us: Option<f64>,
    /// Decode attention (graph replay) with the rows in the scheduler's
    /// order instead of longest first: what the sort buys.
    pub arrival_attention_us: Option<f64>,
}

/// Graph-replayed decode attention µs per step with the rows in `ctx`'s
/// order (`None` when the pool is too small to lay them out).
fn arrival_order_attention<T: Storage>(
    engine: &mut Engine<T>,
    gpu: &Gpu,
    ctx: &[usize],
    num_blocks: usize,
) -> Result<Option<f64>, EngineError>
where
    CudaBlas: Gemm<T>,
{
    let Some(step) = synthetic_decode(ctx, crate::engine::model::BLOCK_SIZE, num_blocks) else {
        return Ok(None);
    };
    let ops = engine.model.profile_step_graph(gpu, &step.input(), 20)?;
    Ok(ops
        .iter()
        .find(|(l, _)| *l == crate::engine::model::DECODE_ATTENTION)
        .map(|&(_, us)| us))
}

/// Host inputs of one decode step, owned (see [`StepInput`] for each).
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticStep {
    pub tokens: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i64>,
    pub tables: Vec<i32>,
    pub mbps: usize,
    pub lens: Vec<i32>,
    pub last: Vec<i32>,
}

impl SyntheticStep {
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            tokens: &self.tokens,
            positions: &self.positions,
            slots: &self.slots,
            tables: &self.tables,
            mbps: self.mbps,
            lens: &self.lens,
            last: &self.last,
            seqs: None,
        }
    }
}

/// Host inputs of a synthetic decode step: sequence i has `ctx[i]` cached
/// tokens in its own run of blocks (laid out one after another from block
/// 0) and adds token `ctx[i]`. `None` when the pool is too small.
pub fn synthetic_decode(
    ctx: &[usize],
    block_size: usize,
    num_blocks: usize,
) -> Option<SyntheticStep> {
    let mbps = ctx.iter().map(|&c| (c + 1).div_ceil(block_size)).max()?;
    let (mut positions, mut slots, mut tables, mut lens) = (vec![], vec![], vec![], vec![]);
    let mut next = 0usize;
    for &c in ctx {
        let nb = (c + 1).div_ceil(block_size);
        let row: Vec<i32> = (next..next + nb).map(|b| b as i32).collect();
        next += nb;
        positions.push(c as i32);
        lens.push(c as i32 + 1);
        slots.push(row[c / block_size] as i64 * block_size as i64 + (c % block_size) as i64);
        tables.extend_from_slice(&row);
        tables.extend(std::iter::repeat_n(0, mbps - nb));
    }
    if next > num_blocks {
        return None;
    }
    let n = ctx.len();
    Some(SyntheticStep {
        tokens: (0..n as u32).map(|i| (i * 7919) % 1000).collect(),
        positions,
        slots,
        tables,
        mbps,
        lens,
        last: (0..n as i32).collect(),
    })
}

/// The q-quantile (nearest rank) of `v`; 0 when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

pub struct E2eSpec<'a> {
    pub engine_name: &'a str,
    pub model_name: &'a str,
    pub workload_name: &'a str,
    pub temperature: f32,
    pub seed: u64,
}

/// Run `requests` through a fresh engine; `progress` shows output tokens.
pub fn run<T: Storage>(
    gpu: &Gpu,
    cfg: &Qwen2Config,
    src: WeightSource<'_>,
    ec: EngineConfig,
    requests: &[WorkloadRequest],
    spec: &E2eSpec<'_>,
    progress: bool,
) -> Result<E2eResult, EngineError>
where
    CudaBlas: Gemm<T>,
{
    let mut engine = Engine::<T>::new(gpu, cfg, src, ec)?;
    let params = |max_tokens: usize, seed: u64| SamplingParams {
        temperature: spec.temperature,
        top_k: 0,
        top_p: 1.0,
        seed: Some(seed),
        ignore_eos: true,
        max_tokens,
    };
    // Warm-up: compile every kernel module and create cuBLAS's handles.
    let warm = Request {
        id: u64::MAX,
        prompt: requests
            .first()
            .map(|r| r.prompt[..r.prompt.len().min(16)].to_vec())
            .unwrap_or_else(|| vec![1]),
        params: params(4, spec.seed),
        eos: vec![],
    };
    engine
        .add(warm)
        .map_err(|e| EngineError::Model(crate::engine::model::ModelError::Inputs(e.to_string())))?;
    while !engine.is_finished() {
        engine.step(gpu)?;
    }
    engine.take_finished();
    gpu.synchronize()?;

    let mut added = 0;
    for (i, r) in requests.iter().enumerate() {
        let req = Request {
            id: i as u64,
            prompt: r.prompt.clone(),
            params: params(r.max_tokens, spec.seed.wrapping_add(i as u64)),
            eos: cfg.eos_token_ids.clone(),
        };
        // A request the engine cannot take (e.g. longer than --max-model-len)
        // is reported and skipped; the others run.
        match engine.add(req) {
            Ok(_) => added += 1,
            Err(e) => eprintln!("warning: request {i} rejected: {e}"),
        }
    }
    let total_out: usize = requests.iter().map(|r| r.max_tokens).sum();
    let bar = if progress {
        let b = ProgressBar::new(total_out as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} output tokens ({per_sec}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    engine.reset_clock();
    let t0 = Instant::now();
    let (mut prefill_s, mut decode_s) = (0.0, 0.0);
    let (mut prefill_tok, mut decode_tok) = (0usize, 0usize);
    let mut steps = 0;
    let mut full: Vec<f64> = Vec::new();
    let mut full_ctx: Vec<usize> = Vec::new();
    let full_batch = added.min(ec.max_num_seqs);
    let mut done: Vec<Finished> = Vec::new();
    while !engine.is_finished() {
        // Context lengths of a decode step, taken before it runs.
        let ctx: Vec<usize> = engine
            .sched
            .running()
            .iter()
            .filter_map(|&id| engine.sched.sequence(id).map(|s| s.len().saturating_sub(1)))
            .collect();
        let Some(st) = engine.step(gpu)? else {
            done.extend(engine.take_finished());
            continue;
        };
        steps += 1;
        match st.kind {
            BatchKind::Prefill => {
                prefill_s += st.seconds;
                prefill_tok += st.tokens;
            }
            BatchKind::Decode => {
                decode_s += st.seconds;
                decode_tok += st.tokens;
                bar.inc(st.seqs as u64);
                if st.seqs == full_batch && full_batch > 0 {
                    full.push(st.seconds);
                    full_ctx = ctx;
                }
            }
        }
        if st.kind == BatchKind::Prefill {
            bar.inc(st.seqs as u64);
        }
        bar.set_message(format!("{} running", engine.sched.num_running()));
        done.extend(engine.take_finished());
    }
    gpu.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    done.extend(engine.take_finished());

    let prompt_tokens: usize = done.iter().map(|f| f.seq.num_prompt_tokens).sum();
    let output_tokens: usize = done.iter().map(|f| f.seq.num_completion_tokens()).sum();
    let ttft: Vec<f64> = done.iter().map(|f| f.first_token_s * 1e3).collect();
    let tpot: Vec<f64> = done
        .iter()
        .filter(|f| f.seq.num_completion_tokens() > 1)
        .map(|f| (f.finish_s - f.first_token_s) * 1e3 / (f.seq.num_completion_tokens() - 1) as f64)
        .collect();
    let (free, total) = gpu
        .context()
        .mem_get_info()
        .map_err(KernelError::driver("query GPU memory"))?;
    let row = E2eRow {
        engine: spec.engine_name.to_string(),
        model: spec.model_name.to_string(),
        workload: spec.workload_name.to_string(),
        num_seqs: done.len(),
        prompt_tokens,
        output_tokens,
        seconds,
        output_tok_per_s: output_tokens as f64 / seconds,
        total_tok_per_s: (prompt_tokens + output_tokens) as f64 / seconds,
        ttft_p50_ms: quantile(&ttft, 0.5),
        tpot_p50_ms: quantile(&tpot, 0.5),
    };
    // The breakdown: a decode step at the full batch with the contexts of
    // the last full-batch step, on blocks of the (now empty) pool.
    let mut breakdown = None;
    let mut arrival_attention_us = None;
    // The engine runs decode rows longest first (`runner::longest_first`);
    // the breakdown does too, and times attention in arrival order beside.
    let arrival_ctx = full_ctx.clone();
    full_ctx.sort_by(|a, b| b.cmp(a));
    if !full_ctx.is_empty() {
        let nb = engine.model.limits().num_blocks;
        if let Some(step) = synthetic_decode(&full_ctx, crate::engine::model::BLOCK_SIZE, nb) {
            let inp = step.input();
            let eager = engine.model.profile_step(gpu, &inp, 20)?;
            let (graph_ops, graph_us) = if ec.cuda_graphs {
                let b = full_ctx.len();
                let ops = engine.model.profile_step_graph(gpu, &inp, 20)?;
                arrival_attention_us = arrival_order_attention(&mut engine, gpu, &arrival_ctx, nb)?;
                engine.model.step_decode_graph(gpu, &inp, b)?;
                (Some(ops), Some(engine.model.time_decode_graph(gpu, b, 50)?))
            } else {
                (None, None)
            };
            let ops: Vec<(&'static str, Option<f64>, f64)> = eager
                .iter()
                .map(|&(label, us)| {
                    let g = graph_ops
                        .as_ref()
                        .and_then(|g| g.iter().find(|(l, _)| *l == label).map(|&(_, v)| v));
                    (label, g, us)
                })
                .collect();
            let kernels_us = ops.iter().map(|&(_, g, e)| g.unwrap_or(e)).sum();
            breakdown = Some(Breakdown {
                batch: full_ctx.len(),
                ops,
                kernels_us,
                graph_us,
                arrival_attention_us,
            });
        }
    }
    let per_s = |tok: usize, s: f64| if s > 0.0 { tok as f64 / s } else { 0.0 };
    Ok(E2eResult {
        row,
        prefill_tok_per_s: per_s(prefill_tok, prefill_s),
        decode_tok_per_s: per_s(decode_tok, decode_s),
        ttft_p99_ms: quantile(&ttft, 0.99),
        tpot_p99_ms: quantile(&tpot, 0.99),
        peak_gpu_mib: (total - free) as f64 / (1u64 << 20) as f64,
        preemptions: engine.sched.num_preemptions(),
        steps,
        num_blocks: engine.model.limits().num_blocks,
        full_decode: (!full.is_empty()).then(|| {
            (
                full.len(),
                full.iter().sum::<f64>() / full.len() as f64,
                full_ctx,
            )
        }),
        breakdown,
        gemm_plans: engine.model.gemm_plans(),
    })
}

/// The tuned GEMM plans of one token count (a decode batch) as a table:
/// shape, candidates timed, the pick and its µs against the heuristic's
/// first (inputs hot in L2: a ranking, not a step time).
pub fn gemm_plans_table(
    plans: &[kernels::linear_lt::PlanInfo],
    tokens: usize,
) -> Option<comfy_table::Table> {
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    let rows: Vec<_> = plans.iter().filter(|p| p.n == tokens && p.tuned).collect();
    if rows.is_empty() {
        return None;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "GEMM (tokens x in -> out)",
        "candidates timed",
        "pick",
        "split-K",
        "µs pick",
        "µs heuristic #1",
    ]);
    let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    for p in rows {
        t.add_row(vec![
            format!("{} x {} -> {}", p.n, p.k, p.m),
            format!("{}/{}", p.tried, p.candidates),
            format!("#{}", p.chosen + 1),
            p.config
                .split_k
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            f(p.best_us),
            f(p.heuristic_first_us),
        ]);
    }
    Some(t)
}

/// Columns of `e2e-breakdown.csv`.
const BREAKDOWN_HEADER: [&str; 6] = [
    "model",
    "batch",
    "op",
    "graph_us_per_step",
    "eager_us_per_step",
    "share",
];

/// The breakdown as a table (per op: graph-replay µs, its share, eager
/// µs; then the sum, the unmarked graph and the floor against the floor),
/// appended to the CSV at `path`. A file with another header is moved
/// aside to `<name>.old.csv` first, so rows never mix schemas.
pub fn breakdown_report(
    bd: &Breakdown,
    floor_us: f64,
    model: &str,
    path: &Path,
) -> anyhow::Result<comfy_table::Table> {
    use anyhow::Context;
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let header = BREAKDOWN_HEADER.join(",");
    let first_line = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().next().map(str::to_string));
    if let Some(line) = &first_line {
        if line.trim() != header {
            let old = path.with_extension("old.csv");
            std::fs::rename(path, &old)
                .with_context(|| format!("moving {} aside", path.display()))?;
            eprintln!(
                "note: {} had other columns; moved to {}",
                path.display(),
                old.display()
            );
        }
    }
    let fresh = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = csv::Writer::from_writer(file);
    if fresh {
        w.write_record(BREAKDOWN_HEADER)?;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "op (all layers)",
        "µs per step (graph)",
        "share",
        "µs eager",
    ]);
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let batch = bd.batch.to_string();
    for &(op, g, e) in &bd.ops {
        let share = g.unwrap_or(e) / bd.kernels_us;
        t.add_row(vec![
            op.to_string(),
            fmt(g),
            format!("{:.1}%", 100.0 * share),
            format!("{e:.1}"),
        ]);
        w.write_record([
            model,
            &batch,
            op,
            &g.map(|x| format!("{x:.2}")).unwrap_or_default(),
            &format!("{e:.2}"),
            &format!("{share:.4}"),
        ])?;
    }
    let eager_sum: f64 = bd.ops.iter().map(|o| o.2).sum();
    let graph_sum = bd.ops.iter().map(|o| o.1).sum::<Option<f64>>();
    t.add_row(vec![
        "sum of ops".to_string(),
        fmt(graph_sum),
        format!("{:.2}x floor", bd.kernels_us / floor_us),
        format!("{eager_sum:.1}"),
    ]);
    if let Some(us) = bd.arrival_attention_us {
        // Not part of the step: the same attention with unsorted rows.
        t.add_row(vec![
            "(paged_attention, rows in arrival order)".to_string(),
            format!("{us:.1}"),
            String::new(),
            String::new(),
        ]);
        w.write_record([
            model,
            &batch,
            "paged_attention (rows in arrival order)",
            &format!("{us:.2}"),
            "",
            "",
        ])?;
    }
    for (label, us) in [
        ("graph replay of the step (no events)", bd.graph_us),
        ("roofline floor", Some(floor_us)),
    ] {
        if let Some(us) = us {
            t.add_row(vec![
                label.to_string(),
                format!("{us:.1}"),
                format!("{:.2}x floor", us / floor_us),
                String::new(),
            ]);
            w.write_record([model, &batch, label, &format!("{us:.2}"), "", ""])?;
        }
    }
    w.flush()?;
    Ok(t)
}

/// Append `row` to `path` (header when the file is new or empty).
pub fn append_csv(row: &E2eRow, path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let fresh = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = csv::WriterBuilder::new().has_headers(fresh).from_writer(f);
    w.serialize(row)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_decode_gives_each_sequence_its_own_blocks() {
        let SyntheticStep {
            tokens: tok,
            positions: pos,
            slots,
            tables,
            mbps,
            lens,
            last,
        } = synthetic_decode(&[0, 15, 16, 40], 16, 100).unwrap();
        assert_eq!(mbps, 3);
        assert_eq!(pos, vec![0, 15, 16, 40]);
        assert_eq!(lens, vec![1, 16, 17, 41]);
        // blocks: seq0 [0], seq1 [1], seq2 [2, 3], seq3 [4, 5, 6]
        assert_eq!(tables, vec![0, 0, 0, 1, 0, 0, 2, 3, 0, 4, 5, 6]);
        assert_eq!(slots, vec![0, 16 + 15, 3 * 16, 6 * 16 + 8]);
        assert_eq!((tok.len(), last), (4, vec![0, 1, 2, 3]));
        assert!(synthetic_decode(&[40], 16, 2).is_none());
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn csv_gets_one_header_and_appends_rows() {
        let dir = std::env::temp_dir().join(format!("wb-e2e-{}", std::process::id()));
        let path = dir.join("e2e.csv");
        let _ = std::fs::remove_file(&path);
        let row = E2eRow {
            engine: "workbench".into(),
            model: "qwen2-0.5b".into(),
            workload: "nanovllm-256".into(),
            num_seqs: 2,
            prompt_tokens: 10,
            output_tokens: 20,
            seconds: 1.5,
            output_tok_per_s: 13.3,
            total_tok_per_s: 20.0,
            ttft_p50_ms: 1.0,
            tpot_p50_ms: 2.0,
        };
        append_csv(&row, &path).unwrap();
        append_csv(&row, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            "engine,model,workload,num_seqs,prompt_tokens,output_tokens,seconds,\
             output_tok_per_s,total_tok_per_s,ttft_p50_ms,tpot_p50_ms"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
