//! Small helpers shared by the launchers.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::Result;
use cudarc::driver::{CudaFunction, LaunchConfig};

/// The kernel symbol for storage type `T`: `base_bf16`, `base_f16`, `base_f32`.
pub(crate) fn typed_function<T: Storage>(
    gpu: &Gpu,
    stem: &'static str,
    base: &str,
) -> Result<CudaFunction> {
    gpu.function(stem, &format!("{base}_{}", T::DTYPE.suffix()))
}

/// Threads per block for a row of `work` items: a multiple of 32 in [32, max].
pub(crate) fn threads_for(work: usize, max: u32) -> u32 {
    let w = work.div_ceil(32).max(1) * 32;
    (w as u32).min(max)
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid sizes are u32 on the device; reject what does not fit instead of truncating.
pub(crate) fn grid_u32(op: &'static str, arg: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| crate::error::KernelError::Shape {
        op,
        arg,
        expected: "<= 2^32 - 1".into(),
        actual: v.to_string(),
    })
}
