//! Launchers for `cuda/rmsnorm.cu`: RMSNorm, plain and fused with the residual add.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, Result};
use crate::launch::{cfg, grid_u32, threads_for, typed_function};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

const OP: &str = "rmsnorm";

#[derive(Clone, Copy, Debug)]
pub struct RmsNormDims {
    pub tokens: usize,
    pub hidden: usize,
    pub eps: f32,
}

fn check(d: &RmsNormDims, out: usize, x: usize, weight: usize) -> Result<i32> {
    let hidden = dim_i32(OP, "hidden", d.hidden)?;
    check_len(OP, "x [tokens, hidden]", x, d.tokens * d.hidden)?;
    check_len(OP, "out [tokens, hidden]", out, d.tokens * d.hidden)?;
    check_len(OP, "weight [hidden]", weight, d.hidden)?;
    Ok(hidden)
}

/// out = x * rsqrt(mean(x^2) + eps) * weight, row by row.
/// x, out [tokens, hidden]; weight [hidden].
pub fn rmsnorm<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    x: &CudaView<T>,
    weight: &CudaView<T>,
    d: RmsNormDims,
) -> Result<()> {
    let hidden = check(&d, out.len(), x.len(), weight.len())?;
    if d.tokens == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "rmsnorm", "rmsnorm")?;
    let vec = 16 / std::mem::size_of::<T>();
    let c = cfg(
        (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
        threads_for(d.hidden.div_ceil(vec), 1024),
    );
    let eps = d.eps;
    // SAFETY: out and x hold tokens*hidden elements and weight hidden (checked
    // above); the kernel's grid is one block per row, so it touches no more.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(out)
            .arg(x)
            .arg(weight)
            .arg(&eps)
            .arg(&hidden)
            .launch(c)
    }
    .map_err(crate::KernelError::driver("launch rmsnorm"))?;
    Ok(())
}

/// residual = round(x + residual) in place; out = RMSNorm(residual) * weight.
/// x, residual, out [tokens, hidden]; weight [hidden].
pub fn fused_add_rmsnorm<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    residual: &mut CudaViewMut<T>,
    x: &CudaView<T>,
    weight: &CudaView<T>,
    d: RmsNormDims,
) -> Result<()> {
    let hidden = check(&d, out.len(), x.len(), weight.len())?;
    check_len(
        OP,
        "residual [tokens, hidden]",
        residual.len(),
        d.tokens * d.hidden,
    )?;
    if d.tokens == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "rmsnorm", "fused_add_rmsnorm")?;
    let vec = 16 / std::mem::size_of::<T>();
    let c = cfg(
        (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
        threads_for(d.hidden.div_ceil(vec), 1024),
    );
    let eps = d.eps;
    // SAFETY: out, residual and x hold tokens*hidden elements and weight hidden
    // (checked above); one block per row.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(out)
            .arg(residual)
            .arg(x)
            .arg(weight)
            .arg(&eps)
            .arg(&hidden)
            .launch(c)
    }
    .map_err(crate::KernelError::driver("launch fused_add_rmsnorm"))?;
    Ok(())
}
