//! Launchers for `cuda/util.cu`: random fills for perf inputs and the copy
//! kernel that is one of the two measured bandwidth ceilings.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{KernelError, Result};
use crate::launch::{cfg, typed_function};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

/// Fill `out` with uniform values in [lo, hi) from a hash of (seed, index).
pub fn fill_random<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "util", "fill_random")?;
    let n = out.len() as i64;
    let blocks = (out.len().div_ceil(256)).min(gpu.info().sm_count.max(1) as usize * 16) as u32;
    // SAFETY: the kernel writes exactly n = out.len() elements (grid-stride, i < n).
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(out)
            .arg(&n)
            .arg(&seed)
            .arg(&lo)
            .arg(&hi)
            .launch(cfg((blocks, 1, 1), 256))
    }
    .map_err(KernelError::driver("launch fill_random"))?;
    Ok(())
}

/// dst <- src with the 16-byte copy kernel on `blocks` x `threads`.
/// Both buffers hold 16-byte words (`[u32; 4]`).
pub fn copy_vec16(
    gpu: &Gpu,
    dst: &mut CudaSlice<[u32; 4]>,
    src: &CudaSlice<[u32; 4]>,
    blocks: u32,
    threads: u32,
) -> Result<()> {
    if dst.len() != src.len() {
        return Err(KernelError::Shape {
            op: "copy_vec16",
            arg: "dst",
            expected: format!("{} words", src.len()),
            actual: format!("{} words", dst.len()),
        });
    }
    let f = gpu.function("util", "copy_vec16")?;
    let n = src.len() as i64;
    // SAFETY: both buffers hold n 16-byte words (checked); the kernel stays below n.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(dst)
            .arg(src)
            .arg(&n)
            .launch(cfg((blocks, 1, 1), threads))
    }
    .map_err(KernelError::driver("launch copy_vec16"))?;
    Ok(())
}

/// y [rows, cols] += b [cols], broadcast over rows.
pub fn add_bias<T: Storage>(
    gpu: &Gpu,
    y: &mut CudaViewMut<T>,
    b: &CudaView<T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    crate::error::check_len("add_bias", "y [rows, cols]", y.len(), rows * cols)?;
    crate::error::check_len("add_bias", "b [cols]", b.len(), cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "util", "add_bias")?;
    let (r, c) = (
        rows as i64,
        crate::error::dim_i32("add_bias", "cols", cols)?,
    );
    let blocks = (rows * cols)
        .div_ceil(256)
        .min(gpu.info().sm_count.max(1) as usize * 16) as u32;
    // SAFETY: y holds rows*cols and b cols elements (checked); grid-stride below rows*cols.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(y)
            .arg(b)
            .arg(&r)
            .arg(&c)
            .launch(cfg((blocks, 1, 1), 256))
    }
    .map_err(KernelError::driver("launch add_bias"))?;
    Ok(())
}
