//! GPU runtime and kernel launchers.
//!
//! The CUDA C++ sources in `kernels/cuda/` are embedded in the binary
//! ([`compile::SOURCES`]) and compiled with NVRTC on first use, for the
//! compute capability of the device at hand ([`Gpu`]). Each kernel has one
//! launcher file with the same stem as its `.cu` file; launchers check shapes on
//! the host and return [`KernelError`] naming the op and the argument.
//!
//! Everything here builds without CUDA installed (cudarc's dynamic loading);
//! [`Gpu::new`] turns a missing driver, device, NVRTC or cuBLAS into an error
//! that says what is missing and how to fix it.

pub mod compile;
pub mod device;
pub mod dtype;
pub mod error;
pub mod kv_store;
mod launch;
pub mod linear;
pub mod linear_lt;
pub mod paged_attention;
pub mod prefill_attention;
pub mod rmsnorm;
pub mod rope;
pub mod rope_kv_store;
pub mod silu_mul;
pub mod timing;
pub mod util;

pub use cudarc;
pub use device::{DeviceInfo, Gpu};
pub use dtype::{DType, Storage};
pub use error::{KernelError, Result};
