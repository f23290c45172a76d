//! Every embedded CUDA source compiles with NVRTC for sm_90a (H100) and sm_80
//! (A100). Needs libnvrtc and the CUDA headers but no GPU: CI gets both from
//! the PyPI wheels (`.ci/test`). Without them this test fails and says so; it
//! never passes by skipping.

use kernels::compile::{compile, cuda_include_dir, require_nvrtc, SOURCES, UTIL_SOURCES};

fn setup() {
    if let Err(e) = require_nvrtc().and_then(|_| cuda_include_dir().map(|_| ())) {
        panic!("{e}\nRun the tests with `.ci/test`, which installs NVRTC and the CUDA headers from PyPI and sets CUDA_HOME.");
    }
}

#[test]
fn every_kernel_compiles_for_sm90a_and_sm80() {
    setup();
    let mut failures = Vec::new();
    for (stem, _) in SOURCES.iter().chain(UTIL_SOURCES) {
        for arch in ["sm_90a", "sm_80"] {
            match compile(stem, arch, &[]) {
                Ok(ptx) => assert!(
                    ptx.to_src().contains(".entry"),
                    "{stem} for {arch}: PTX has no kernel entry"
                ),
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_compile_error_names_the_kernel_and_shows_the_log() {
    setup();
    // A source that is not in the registry is refused by name...
    let err = compile("no_such_kernel", "sm_90a", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_kernel"), "{err}");
    // ...and NVRTC's log comes through for a bad option.
    let err = compile("rmsnorm", "sm_90a", &["--no-such-flag"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rmsnorm"), "{err}");
    assert!(err.contains("no-such-flag"), "{err}");
}
