//! Typed errors of the runtime and the launchers.

use thiserror::Error;

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum KernelError {
    /// A CUDA library could not be loaded (cudarc would panic; we check first).
    #[error("{lib} not found: {hint}")]
    MissingLibrary { lib: &'static str, hint: String },

    #[error("no CUDA device found: the driver loaded but reports 0 devices (check `nvidia-smi` and CUDA_VISIBLE_DEVICES)")]
    NoDevice,

    #[error("CUDA headers not found (cuda_bf16.h): searched {searched}; set CUDA_HOME to a CUDA 12+ toolkit")]
    MissingHeaders { searched: String },

    #[error("CUDA driver call failed in {op}: {source}")]
    Driver {
        op: String,
        #[source]
        source: cudarc::driver::DriverError,
    },

    #[error("cuBLAS call failed in {op}: {msg}")]
    Blas { op: String, msg: String },

    /// NVRTC rejected a kernel source; `log` is NVRTC's own log.
    #[error("NVRTC failed to compile kernel source `{kernel}` for {arch}:\n{log}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
    },

    #[error("no kernel source named `{0}` in kernels::compile")]
    UnknownSource(String),

    /// A launcher argument has the wrong length or an impossible dimension.
    #[error("{op}: {arg} has {actual}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        actual: String,
    },

    #[error("{op}: unsupported {what}")]
    Unsupported { op: &'static str, what: String },
}

impl KernelError {
    /// Wrap a driver error with the operation that produced it.
    pub fn driver(op: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        let op = op.into();
        move |source| KernelError::Driver { op, source }
    }

    pub(crate) fn shape(
        op: &'static str,
        arg: &'static str,
        expected: impl ToString,
        actual: impl ToString,
    ) -> Self {
        KernelError::Shape {
            op,
            arg,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}

/// Check that a device buffer holds exactly `expected` elements.
pub(crate) fn check_len(
    op: &'static str,
    arg: &'static str,
    actual: usize,
    expected: usize,
) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::shape(
            op,
            arg,
            format!("{expected} elements"),
            format!("{actual} elements"),
        ))
    }
}

/// Check that a dimension fits the kernel's i32 parameters and is positive.
pub(crate) fn dim_i32(op: &'static str, arg: &'static str, v: usize) -> Result<i32> {
    if v == 0 {
        return Err(KernelError::shape(op, arg, ">= 1", v));
    }
    i32::try_from(v).map_err(|_| KernelError::shape(op, arg, "<= 2^31 - 1", v))
}
