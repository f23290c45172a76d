//! `workbench generate` on the tiny golden Qwen2 (`tests/golden/qwen2-tiny`)
//! and its one-id-per-byte tokenizer (`tests/golden/make_tiny_tokenizer.py`):
//! the tokenizer and chat template on the CPU, the CLI's errors (exit 2, one
//! line, before any GPU work), and on a GPU the streamed text of HF's greedy
//! continuation.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use workbench::generate::{ChatTokenizer, PromptMode};

/// The binary cargo built, or the one a GPU host's bundle carries beside
/// the tests (as in `tests/cli.rs`).
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

/// The tiny checkpoint: under CARGO_MANIFEST_DIR when that exists, else
/// relative to the current directory (a GPU host runs the tests from the
/// repository root of another checkout).
fn tiny_dir() -> PathBuf {
    let rel = "tests/golden/qwen2-tiny";
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    if built.join("tokenizer.json").exists() {
        built
    } else {
        PathBuf::from(rel)
    }
}

fn tiny() -> ChatTokenizer {
    ChatTokenizer::from_dir(&tiny_dir()).expect("the tiny tokenizer loads")
}

fn workbench(args: &[&str]) -> Output {
    run_with(args, None, &[])
}

/// Run with stdin fed `stdin` (closed when `None`) and extra environment.
fn run_with(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the workbench binary runs");
    {
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(bytes) = stdin {
            pipe.write_all(bytes).expect("write stdin");
        }
    }
    child
        .wait_with_output()
        .expect("the workbench binary finishes")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 2, a single `error:` line naming `needle`, no panic.
fn assert_setup_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(o.stdout.is_empty(), "no output on error");
}

#[test]
fn tiny_tokenizer_round_trips_utf8_one_id_per_byte() {
    let t = tiny();
    let ids = t.encode("héllo", true).unwrap();
    assert_eq!(ids, vec![104, 0xC3, 0xA9, 108, 108, 111]);
    assert_eq!(t.decode(&ids, true).unwrap(), "héllo");
    let text = "tab\t, newline\n, € and 😀";
    let ids = t.encode(text, false).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(t.decode(&ids, true).unwrap(), text);
    for (i, s) in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
    {
        assert_eq!(t.token_to_id(s), Some(253 + i as u32), "{s}");
    }
    assert_eq!(t.decode(&[104, 255, 105], true).unwrap(), "hi");
    assert_eq!(t.decode(&[104, 255, 105], false).unwrap(), "h<|im_end|>i");
    assert_eq!(
        t.eos_ids(),
        &[255],
        "tokenizer_config's eos_token <|im_end|>"
    );
}

/// The ids are what transformers 5.24's `apply_chat_template(...,
/// add_generation_prompt=True)` gives for the same directory.
#[test]
fn chat_template_renders_chatml_with_the_special_ids() {
    let t = tiny();
    let text = t.render_chat(None, "héllo").unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = t
        .prompt_ids("héllo", &PromptMode::Chat { system: None })
        .unwrap();
    let hf: Vec<u32> = vec![
        254, 115, 121, 115, 116, 101, 109, 10, 89, 111, 117, 32, 97, 114, 101, 32, 97, 32, 104,
        101, 108, 112, 102, 117, 108, 32, 97, 115, 115, 105, 115, 116, 97, 110, 116, 46, 255, 10,
        254, 117, 115, 101, 114, 10, 104, 195, 169, 108, 108, 111, 255, 10, 254, 97, 115, 115, 105,
        115, 116, 97, 110, 116, 10,
    ];
    assert_eq!(ids, hf);
    let ids = t
        .prompt_ids(
            "héllo",
            &PromptMode::Chat {
                system: Some("Be brief.".into()),
            },
        )
        .unwrap();
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(ids.iter().filter(|&&i| i == 254).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 255).count(), 2);
}

#[test]
fn a_preset_has_no_tokenizer_exit_2() {
    let o = workbench(&["generate", "--model", "qwen2-0.5b", "hi"]);
    assert_setup_error(&o, "tokenizer");
    assert!(stderr(&o).contains("preset"), "{}", stderr(&o));
}

#[test]
fn a_missing_model_or_tokenizer_is_exit_2() {
    assert_setup_error(
        &workbench(&["generate", "--model", "/nonexistent", "hi"]),
        "/nonexistent",
    );
    // A checkpoint directory without tokenizer.json names the directory.
    let dir = std::env::temp_dir().join(format!("wb-gen-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tiny_dir().join("config.json"), dir.join("config.json")).unwrap();
    let o = workbench(&["generate", "--model", dir.to_str().unwrap(), "hi"]);
    assert_setup_error(&o, "no tokenizer.json in");
    assert!(stderr(&o).contains(dir.to_str().unwrap()), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_prompts_and_flags_are_exit_2_before_the_gpu() {
    let dir = tiny_dir();
    let m = dir.to_str().unwrap();
    assert_setup_error(
        &workbench(&["generate", "--model", m, ""]),
        "prompt is empty",
    );
    // No argument: stdin, here empty (a lone newline is dropped as echo's).
    assert_setup_error(
        &run_with(&["generate", "--model", m], Some(b"\n"), &[]),
        "prompt is empty",
    );
    assert_setup_error(
        &run_with(&["generate", "--model", m], Some(b"\xff"), &[]),
        "not UTF-8",
    );
    assert_setup_error(
        &workbench(&["generate", "--model", m, "--raw", "--system", "s", "hi"]),
        "--system",
    );
    assert_setup_error(
        &workbench(&["generate", "--model", m, "--temperature=-1", "hi"]),
        "--temperature",
    );
    assert_setup_error(
        &workbench(&["generate", "--model", m, "--top-p", "1.5", "hi"]),
        "--top-p",
    );
    assert_setup_error(
        &workbench(&["generate", "--model", m, "--max-tokens", "0", "hi"]),
        "--max-tokens",
    );
    // max_position_embeddings is 128: the ChatML prompt plus 256 tokens do not fit.
    assert_setup_error(
        &workbench(&["generate", "--model", m, "hi"]),
        "exceeds max_model_len 128",
    );
    assert_setup_error(
        &workbench(&[
            "generate",
            "--model",
            m,
            "--gpu-memory-utilization",
            "0",
            "hi",
        ]),
        "--gpu-memory-utilization",
    );
}

/// A valid request with no GPU visible (CI has no driver; a GPU host hides
/// its devices) gets as far as the GPU and says what is missing, exit 2.
#[test]
fn a_valid_request_without_a_gpu_is_one_line_and_exit_2() {
    let dir = tiny_dir();
    let o = run_with(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--max-tokens",
            "8",
            "hi",
        ],
        None,
        &[("CUDA_VISIBLE_DEVICES", "")],
    );
    let err = stderr(&o);
    assert_setup_error(&o, "");
    assert!(
        err.contains("libcuda")
            || err.contains("no CUDA device")
            || err.contains("libnvrtc")
            || err.contains("headers"),
        "{err}"
    );
}

/// Greedy text of the golden's first prompt ([7], the text "\u{7}") is the
/// tokenizer's decode of HF's greedy continuation, streamed to stdout.
#[test]
#[ignore = "needs a CUDA GPU"]
fn generate_streams_hf_greedy_text_for_the_tiny_golden() {
    let dir = tiny_dir();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
    )
    .expect("golden.json parses");
    let case = &golden["cases"][0];
    assert_eq!(case["prompt"], serde_json::json!([7]));
    let greedy: Vec<u32> = case["greedy"]
        .as_array()
        .expect("greedy ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect();
    assert_eq!(greedy.len(), 8);
    let expected = tiny().decode(&greedy, true).unwrap();

    let o = workbench(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--raw",
        "--dtype",
        "f32",
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        "8",
        "\u{7}",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        expected,
        "stderr: {err}"
    );
    let stats = err
        .lines()
        .find(|l| l.contains("generated tokens"))
        .unwrap_or_else(|| panic!("no stats line in: {err}"));
    assert!(stats.contains("1 prompt tokens"), "{stats}");
    assert!(stats.contains(" 8 generated tokens"), "{stats}");
    assert!(stats.contains("finish max_tokens"), "{stats}");
    assert!(!err.contains("CUDA graphs off"), "{err}");
}
