//! The binary as users run it: exit codes, one-line errors, no panics.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The binary cargo built; on a GPU host the bundle carries tests and binary
/// to other paths (`.gpu/tests/cli` beside `.gpu/bin/workbench`).
fn bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_workbench"));
    if built.exists() {
        return built;
    }
    let me = std::env::current_exe().expect("test executable path");
    let bundled = me
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("bin/workbench"));
    bundled.filter(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "workbench binary not found at {} nor beside {}",
            built.display(),
            me.display()
        )
    })
}

fn workbench(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("the workbench binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 2, a single `error:` line, no panic or backtrace.
fn assert_setup_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn list_shows_every_kernel() {
    let o = workbench(&["list"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for name in workbench::registry::names() {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
}

#[test]
fn bad_input_is_exit_2_before_any_gpu_work() {
    assert_setup_error(
        &workbench(&["check", "rmsnrom"]),
        "unknown kernel `rmsnrom`",
    );
    assert_setup_error(
        &workbench(&["check", "rmsnorm", "--case", "tokens=2,hiden=8"]),
        "unknown key `hiden`",
    );
    assert_setup_error(
        &workbench(&["check", "rmsnorm", "--case", "tokens=0,hidden=8"]),
        "tokens=0",
    );
    assert_setup_error(
        &workbench(&[
            "check",
            "paged_attention",
            "--case",
            "batch=1,q_heads=14,kv_heads=3,head_dim=64,block_size=16,ctx=5",
        ]),
        "multiple of kv_heads",
    );
    assert_setup_error(
        &workbench(&["check", "all", "--case", "tokens=1"]),
        "needs one kernel",
    );
    // e2e: bad requests and limits are named before any GPU work.
    assert_setup_error(&workbench(&["e2e", "--num-seqs", "0"]), "--num-seqs 0");
    assert_setup_error(&workbench(&["e2e", "--num-seqs", "300"]), "256 requests");
    assert_setup_error(
        &workbench(&["e2e", "--gpu-memory-utilization", "1.5"]),
        "--gpu-memory-utilization must be in (0, 1]",
    );
    assert_setup_error(
        &workbench(&["e2e", "--max-num-seqs", "0"]),
        "--max-num-seqs 0",
    );
    assert_setup_error(
        &workbench(&["e2e", "--model", "qwen2-0.6b"]),
        "not a preset",
    );
    // parity: a missing golden, or a file that is not one.
    assert_setup_error(
        &workbench(&["parity", "--model", "/nonexistent/model"]),
        "hf_parity.py",
    );
    let dir = std::env::temp_dir().join(format!("wb-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("golden.json"), r#"{"schema_version": 7}"#).unwrap();
    assert_setup_error(
        &workbench(&["parity", "--model", dir.to_str().unwrap()]),
        "not a golden",
    );
    std::fs::remove_dir_all(&dir).ok();
    // clap's own usage errors also exit 2.
    assert_eq!(
        workbench(&["check", "rmsnorm", "--dtype", "fp8"])
            .status
            .code(),
        Some(2)
    );
    // An attention variant the engine does not have: clap names the known ones.
    for (flag, known) in [("--decode-attention", "v9"), ("--prefill-attention", "v8")] {
        let o = workbench(&["e2e", flag, "v0"]);
        assert_eq!(o.status.code(), Some(2), "{flag} v0");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("v0") && err.contains(known), "{flag}: {err}");
    }
}

/// With no GPU visible (CI has no driver at all; a GPU host hides its devices
/// with CUDA_VISIBLE_DEVICES=""), a GPU command says what is missing, exit 2.
#[test]
fn no_usable_gpu_is_one_line_and_exit_2() {
    let o = Command::new(bin())
        .args(["check", "rmsnorm", "--case", "tokens=2,hidden=8"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .expect("runs");
    let err = stderr(&o);
    assert_setup_error(&o, "");
    assert!(
        err.contains("libcuda")
            || err.contains("no CUDA device")
            || err.contains("libnvrtc")
            || err.contains("headers"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn check_one_case_writes_csv_and_json_and_sabotage_exits_1() {
    let dir = std::env::temp_dir().join(format!("wb-cli-{}", std::process::id()));
    let csv = dir.join("check.csv");
    let json = dir.join("check.json");
    let case = "tokens=7,hidden=1025,residual=1,gen=randn,seed=1";
    let o = workbench(&[
        "check",
        "rmsnorm",
        "--case",
        case,
        "--csv",
        csv.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut r = csv::Reader::from_path(&csv).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header.join(","),
        "kernel,case,dtype,max_abs,max_rel,rel_l2,nan,tol_used,pass"
    );
    let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
    // One row per variant and dtype; with several variants the case names its variant.
    let op = workbench::registry::find("rmsnorm").unwrap();
    assert_eq!(rows.len(), op.variants().len() * op.dtypes().len());
    for row in &rows {
        assert!(row[1].ends_with(case), "{row:?}");
        assert_eq!((&row[0], &row[8]), ("rmsnorm", "true"), "{row:?}");
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(doc["device"]["gpu"].as_str().unwrap().contains("NVIDIA"));

    let o = workbench(&[
        "check",
        "rmsnorm",
        "--case",
        case,
        "--sabotage",
        "skip-launch",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(dir);
}

/// A small e2e run through the CLI: one result line, one CSV row with the
/// requested counts, the breakdown beside it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn e2e_small_run_writes_its_csv_row_and_breakdown() {
    let dir = std::env::temp_dir().join(format!("wb-e2e-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let csv = dir.join("e2e.csv");
    let o = workbench(&[
        "e2e",
        "--num-seqs",
        "8",
        "--max-output-len",
        "16",
        "--gpu-memory-utilization",
        "0.3",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("output tok/s"), "{out}");
    assert!(!stderr(&o).contains("CUDA graphs off"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&csv).expect("e2e.csv written");
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 2, "{text}");
    let cols: Vec<&str> = rows[1].split(',').collect();
    assert_eq!(cols[0], "workbench");
    assert_eq!(cols[3], "8", "num_seqs in {text}");
    assert_eq!(cols[5], "128", "8 x 16 output tokens in {text}");
    let breakdown = std::fs::read_to_string(dir.join("e2e-breakdown.csv")).expect("breakdown");
    assert!(breakdown.contains("paged_attention") && breakdown.contains("graph replay"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The committed H100 report's run record: beside the sources when cargo
/// runs the test, in the working directory when the bundle does (GPU host).
fn committed_run_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reports/h100");
    if here.join("run.json").exists() {
        here
    } else {
        PathBuf::from("reports/h100")
    }
}

/// `roofline --render` rebuilds a run's report from its run.json without a
/// GPU: the same rows, a markdown that says it was rebuilt, the plots.
#[test]
fn roofline_render_rebuilds_the_committed_report() {
    let src = committed_run_dir();
    let dir = std::env::temp_dir().join(format!("wb-render-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("run.json"), dir.join("run.json")).unwrap();
    let o = workbench(&["roofline", "--render", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let sorted = |p: PathBuf| {
        let mut v: Vec<String> = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        sorted(dir.join("roofline.csv")),
        sorted(src.join("roofline.csv"))
    );
    let md = std::fs::read_to_string(dir.join("roofline.md")).unwrap();
    assert!(md.contains("report rebuilt from its run.json"), "{md}");
    for plot in ["roofline.png", "roofline.svg", "bandwidth_rope.png"] {
        let len = std::fs::metadata(dir.join(plot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "{plot}: {len} bytes");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn roofline_render_without_a_run_record_is_a_setup_error() {
    let dir = std::env::temp_dir().join(format!("wb-render-none-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = workbench(&["roofline", "--render", dir.to_str().unwrap()]);
    assert_setup_error(&o, "run.json");
    let _ = std::fs::remove_dir_all(dir);
}
