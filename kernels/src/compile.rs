//! Embedded CUDA sources and their NVRTC compilation.
//!
//! Each `kernels/cuda/<stem>.cu` is compiled as one module with
//! `kernels/cuda/common.cuh` prepended (NVRTC accepts no separate header
//! files through cudarc). The architecture comes from the device
//! (`sm_90a` on an H100); CI compiles every source for sm_90a and sm_80 with
//! the NVRTC wheel from PyPI, so a syntax error never needs a GPU to be found.

use crate::error::{KernelError, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::path::PathBuf;

const COMMON: &str = include_str!("../cuda/common.cuh");

/// Every kernel source, by stem. Adding a kernel adds one line here.
pub const SOURCES: &[(&str, &str)] = &[
    ("rmsnorm", include_str!("../cuda/rmsnorm.cu")),
    ("silu_mul", include_str!("../cuda/silu_mul.cu")),
    ("rope", include_str!("../cuda/rope.cu")),
    ("kv_store", include_str!("../cuda/kv_store.cu")),
    ("rope_kv_store", include_str!("../cuda/rope_kv_store.cu")),
    (
        "paged_attention",
        include_str!("../cuda/paged_attention.cu"),
    ),
    (
        "prefill_attention",
        include_str!("../cuda/prefill_attention.cu"),
    ),
];

/// Headers a source may `#include "<name>"`: cudarc hands NVRTC no header
/// files, so [`full_source`] splices each one in where it is included.
pub const HEADERS: &[(&str, &str)] = &[("wgmma.cuh", include_str!("../cuda/wgmma.cuh"))];

/// Measurement helpers (random fills, the copy-kernel bandwidth ceiling):
/// compiled and tested like the kernels, but not in the kernel registry.
pub const UTIL_SOURCES: &[(&str, &str)] = &[("util", include_str!("../cuda/util.cu"))];

fn all_sources() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    SOURCES.iter().chain(UTIL_SOURCES)
}

/// The full text NVRTC sees for `stem`: the shared header, then the source.
pub fn full_source(stem: &str) -> Result<String> {
    let (_, src) = all_sources()
        .find(|(s, _)| *s == stem)
        .ok_or_else(|| KernelError::UnknownSource(stem.to_string()))?;
    Ok(format!(
        "{COMMON}\n#line 1 \"{stem}.cu\"\n{}",
        splice_headers(stem, src)
    ))
}

/// `src` with each `#include "<name>"` of a [`HEADERS`] entry replaced by
/// the header's text; `#line` keeps compiler messages pointing at the right
/// file and line.
fn splice_headers(stem: &str, src: &str) -> String {
    let mut text = String::with_capacity(src.len());
    for (i, line) in src.lines().enumerate() {
        let header = HEADERS
            .iter()
            .find(|(name, _)| line.trim() == format!("#include \"{name}\""));
        match header {
            Some((name, body)) => text.push_str(&format!(
                "#line 1 \"{name}\"\n{body}\n#line {} \"{stem}.cu\"\n",
                i + 2
            )),
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

/// The NVRTC target for a compute capability: the arch-specific `a` form on
/// Hopper and later (wgmma, setmaxnreg need it), plain `sm_XY` before.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major >= 9 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Where the CUDA headers are: `$CUDA_HOME`, `$CUDA_PATH`, then `/usr/local/cuda`.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let mut searched = Vec::new();
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda")));
    for root in roots {
        let inc = root.join("include");
        if inc.join("cuda_bf16.h").is_file() {
            return Ok(inc);
        }
        searched.push(inc.display().to_string());
    }
    Err(KernelError::MissingHeaders {
        searched: searched.join(", "),
    })
}

/// Fail with a clear message instead of cudarc's panic when libnvrtc is absent.
pub fn require_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate library names; no symbols are called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::MissingLibrary {
            lib: "libnvrtc (CUDA runtime compiler)",
            hint: "install CUDA 12+ (or `pip install nvidia-cuda-nvrtc`) and put its lib directory on LD_LIBRARY_PATH".into(),
        })
    }
}

/// Compile one source for `arch` (e.g. "sm_90a"). Extra NVRTC options may be
/// passed, e.g. `--ptxas-options=-v` to read registers and spills.
pub fn compile(stem: &str, arch: &str, extra: &[&str]) -> Result<Ptx> {
    require_nvrtc()?;
    let src = full_source(stem)?;
    let include = cuda_include_dir()?;
    // cudarc wants a &'static str; one small leak per (process, arch) at most
    // since modules are cached by the caller.
    let arch_static: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let mut options = vec!["--std=c++17".to_string()];
    options.extend(extra.iter().map(|s| s.to_string()));
    let opts = CompileOptions {
        arch: Some(arch_static),
        include_paths: vec![include.display().to_string()],
        options,
        name: Some(format!("{stem}.cu")),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| KernelError::Compile {
        kernel: stem.to_string(),
        arch: arch.to_string(),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_included_header_is_spliced_in_and_lines_keep_their_numbers() {
        let out = splice_headers("x", "a\n#include \"wgmma.cuh\"\nb\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "a");
        assert_eq!(lines[1], "#line 1 \"wgmma.cuh\"");
        assert!(out.contains("struct PfWgmma"));
        // "b" is line 3 of x.cu.
        assert_eq!(lines[lines.len() - 2], "#line 3 \"x.cu\"");
        assert_eq!(lines[lines.len() - 1], "b");
        // Other includes are left for NVRTC.
        assert_eq!(
            splice_headers("x", "#include <cuda_bf16.h>\n"),
            "#include <cuda_bf16.h>\n"
        );
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 0), "sm_80");
        assert_eq!(arch_for(8, 9), "sm_89");
    }

    #[test]
    fn every_source_has_the_shared_header_first() {
        for (stem, _) in all_sources() {
            let full = full_source(stem).unwrap();
            assert!(full.starts_with("// common.cuh"));
            assert!(full.contains(&format!("#line 1 \"{stem}.cu\"")));
        }
        let pf = full_source("prefill_attention").unwrap();
        assert!(!pf.contains("#include \"wgmma.cuh\""));
        assert!(pf.contains("struct PfWgmma"));
        assert!(matches!(
            full_source("nope"),
            Err(KernelError::UnknownSource(_))
        ));
    }
}
