//! roofline.md, SETUP.md and the plots of a roofline run.

use crate::ceilings::Ceilings;
use crate::report::Provenance;
use crate::roofline::{verdicts, PerfRow};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

/// Peers' "n/a" reasons, from their missing.csv files: (kernel, impl, reason).
pub type Missing = Vec<(String, String, String)>;

fn us_cell(r: &PerfRow) -> String {
    match (r.us(), r.spread) {
        (None, _) => r.us.clone(),
        (Some(u), Some((lo, hi))) => format!("{u:.2} ({lo:.2}–{hi:.2})"),
        (Some(u), None) => format!("{u:.2}"),
    }
}

pub fn markdown(
    ours: &[PerfRow],
    peers: &[PerfRow],
    missing: &Missing,
    c: &Ceilings,
    prov: &Provenance,
    command: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Roofline: {}\n", prov.gpu);
    let _ = writeln!(
        md,
        "{}\n\nCeilings measured in this run: **{:.0} GB/s** (best of cuMemcpyDtoD and a tuned copy kernel, read + write) and **{:.0} TFLOP/s** (cuBLAS bf16 GEMM 8192³); see `ceilings.csv` and `SETUP.md`. \
Times are medians per call over CUDA-graph replays with inputs rotated over more than twice the L2; ours shows p10–p90 in brackets. \
Each of our cases passed its check against the f64 reference on that exact shape before it was timed (FAIL otherwise). \
`vs best peer` is the fastest peer's time over ours (above 1: we are faster); a peer median inside our p10–p90 is a tie.\n\nProduced by `{command}`.\n",
        prov.line(),
        c.gb_per_s,
        c.tflop_per_s
    );
    let impls: BTreeSet<&str> = peers.iter().map(|p| p.implementation.as_str()).collect();
    let kernels: Vec<&str> = {
        let mut seen = Vec::new();
        for r in ours {
            if !seen.contains(&r.kernel.as_str()) {
                seen.push(r.kernel.as_str());
            }
        }
        seen
    };
    let all = verdicts(ours, peers);
    for k in kernels {
        let _ = writeln!(md, "## {k}\n");
        let mut header = vec!["variant", "case", "ours µs", "GB/s", "% ceiling"];
        header.extend(impls.iter().copied());
        header.extend(["best peer", "vs best peer", "result"]);
        let _ = writeln!(md, "| {} |", header.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
        for v in all.iter().filter(|v| v.ours.kernel == k) {
            let o = v.ours;
            let mut cells = vec![
                o.variant.clone(),
                format!("`{}`", o.case),
                us_cell(o),
                o.gb_per_s.clone(),
                o.pct_of_ceiling.clone(),
            ];
            for i in &impls {
                let cell = v
                    .peers
                    .iter()
                    .find(|p| p.implementation == *i)
                    .map(|p| {
                        if p.us().is_some() {
                            format!("{:.2}", p.us().unwrap_or(0.0))
                        } else {
                            p.us.clone()
                        }
                    })
                    .unwrap_or_else(|| "n/a".into());
                cells.push(cell);
            }
            let best = v.fastest_peer();
            cells.push(
                best.map(|b| b.implementation.clone())
                    .unwrap_or_else(|| "—".into()),
            );
            cells.push(match (best.and_then(|b| b.us()), o.us()) {
                (Some(b), Some(u)) => format!("{:.2}×", b / u),
                _ => "—".into(),
            });
            cells.push(v.outcome().to_string());
            let _ = writeln!(md, "| {} |", cells.join(" | "));
        }
        let notes: Vec<String> = missing
            .iter()
            .filter(|(kk, _, _)| kk == k)
            .map(|(_, i, why)| format!("{i}: n/a ({why})"))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(md, "\nPeers without this op: {}.", notes.join("; "));
        }
        let _ = writeln!(md);
    }
    md.push_str(&fusion_section(ours));
    md
}

fn is_production(kernel: &str, variant: &str) -> bool {
    crate::registry::find(kernel)
        .and_then(|op| op.variants().iter().find(|v| v.production))
        .is_none_or(|v| v.name == variant)
}

/// One key of a case string, read with the case parser every command uses.
fn param(case: &str, key: &str) -> Option<String> {
    case.parse::<crate::case::Case>()
        .ok()?
        .get(key)
        .map(String::from)
}

/// The fused rope_kv_store against our production rope followed by our
/// production kv_store on the same shape (target: 1.3x at prefill sizes).
fn fusion_section(ours: &[PerfRow]) -> String {
    let fused: Vec<&PerfRow> = ours
        .iter()
        .filter(|r| r.kernel == "rope_kv_store")
        .collect();
    if fused.is_empty() {
        return String::new();
    }
    let best = |kernel: &str, case: &PerfRow, keys: &[&str]| -> Option<f64> {
        ours.iter()
            .filter(|r| {
                r.kernel == kernel
                    && keys
                        .iter()
                        .all(|k| param(&r.case, k) == param(&case.case, k))
            })
            .filter_map(|r| r.us())
            .reduce(f64::min)
    };
    let mut md = String::from(
        "## rope_kv_store against rope + kv_store\n\nOur fastest `rope` plus our fastest `kv_store` on the same shape, against the fused kernel. \
The byte model bounds the gain: the pair also writes k back and reads it again, so the best ratio is 1 + 2·kv/(2·q + 4·kv) with q, kv the query and key elements per token (1.10–1.13× for Qwen2's heads), \
so more than that can only come from launch and latency savings at small sizes.\n\n| variant | case | rope µs | kv_store µs | sum µs | fused µs | speed-up | prefill target 1.3× |\n|---|---|---|---|---|---|---|---|\n",
    );
    for f in fused {
        let rope = best("rope", f, &["tokens", "q_heads", "kv_heads", "head_dim"]);
        let kv = best(
            "kv_store",
            f,
            &["tokens", "kv_heads", "head_dim", "block_size"],
        );
        let prefill = param(&f.case, "tokens")
            .and_then(|t| t.parse::<usize>().ok())
            .is_some_and(|t| t >= 4096);
        let (Some(r), Some(k), Some(u)) = (rope, kv, f.us()) else {
            let _ = writeln!(
                md,
                "| {} | `{}` | — | — | — | {} | — | — |",
                f.variant, f.case, f.us
            );
            continue;
        };
        let x = (r + k) / u;
        let target = if !prefill {
            "—"
        } else if x >= 1.3 {
            "met"
        } else {
            "missed"
        };
        let _ = writeln!(
            md,
            "| {} | `{}` | {r:.2} | {k:.2} | {:.2} | {u:.2} | {x:.2}× | {target} |",
            f.variant,
            f.case,
            r + k
        );
    }
    md.push('\n');
    md
}

pub fn setup(prov: &Provenance, c: &Ceilings, extra: &[(String, String)], command: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Setup of this run\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| GPU | {} (cc {}, {}) |",
        prov.gpu, prov.compute_capability, prov.arch
    );
    let _ = writeln!(
        s,
        "| SMs, L2, memory | {}, {:.0} MiB, {:.1} GiB |",
        prov.sm_count, prov.l2_mib, prov.memory_gib
    );
    let _ = writeln!(s, "| CUDA driver API | {} |", prov.cuda_driver);
    for (k, v) in extra {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "| date | {} |", prov.date_utc);
    let _ = writeln!(s, "| command | `{command}` |\n");
    let _ = writeln!(
        s,
        "## Ceilings\n\n| name | value | unit | how |\n|---|---|---|---|"
    );
    for r in &c.rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {} | {} |",
            r.name, r.value, r.unit, r.source
        );
    }
    let _ = writeln!(
        s,
        "\n## Timing\n\nOne path for every number (`kernels/src/timing.rs`): each case gets N independent input sets, N = max(1, ⌈2·L2 / bytes per call⌉) capped at 64; \
every set is launched once eagerly, then one CUDA graph launching on all N sets is captured, replayed 3 times to warm up, and timed replay by replay with CUDA events \
until 150 ms of GPU time (at least 15 replays); time per call = replay time / N, median and p10/p90 over replays. Inputs are random (hash-filled on the GPU), never zeros. \
Peers (benches/peers/) use the same rotation and graph replay and the same byte model (each input read once, each output written once)."
    );
    s
}

pub fn plots(
    ours: &[PerfRow],
    peers: &[PerfRow],
    c: &Ceilings,
    title: &str,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    use crate::plot::{bandwidth_chart, roofline_chart, Ceilings as PlotCeilings, Point};
    let to_point = |r: &PerfRow| -> Option<Point> {
        r.us().map(|us| Point {
            kernel: r.kernel.clone(),
            // Production variants plot as "ours", earlier ones as "ours v1" etc.
            implementation: if r.implementation == "ours" && !is_production(&r.kernel, &r.variant) {
                format!("ours {}", r.variant)
            } else {
                r.implementation.clone()
            },
            case: r.case.clone(),
            bytes: r.bytes as f64,
            flops: r.flops as f64,
            seconds: us * 1e-6,
        })
    };
    let points: Vec<Point> = ours.iter().chain(peers).filter_map(to_point).collect();
    let pc = PlotCeilings {
        gb_per_s: c.gb_per_s,
        tflop_per_s: c.tflop_per_s,
    };
    let mut written = Vec::new();
    if points.is_empty() {
        return Ok(written);
    }
    roofline_chart(
        &points,
        pc,
        &format!("Roofline — {title}"),
        &dir.join("roofline"),
    )?;
    written.push("roofline".to_string());
    let mut kernels: Vec<&str> = points.iter().map(|p| p.kernel.as_str()).collect();
    kernels.dedup();
    let kernels: BTreeSet<&str> = kernels.into_iter().collect();
    for k in kernels {
        let kp: Vec<Point> = points.iter().filter(|p| p.kernel == k).cloned().collect();
        bandwidth_chart(
            k,
            &kp,
            pc,
            &format!("{k} — {title}"),
            &dir.join(format!("bandwidth_{k}")),
        )?;
        written.push(format!("bandwidth_{k}"));
    }
    Ok(written)
}
