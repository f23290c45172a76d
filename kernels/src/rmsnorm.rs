//! Launchers for `cuda/rmsnorm.cu`: RMSNorm, plain and fused with the residual add.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, Result};
use crate::launch::{cfg, grid_u32, threads_for, typed_function, Launch};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

const OP: &str = "rmsnorm";

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2"];
pub const PRODUCTION: &str = "v1";

/// Rows per block and vectors per lane of v2 (rmsnorm.cu).
const V2_ROWS: usize = 4;
const V2_MAX_VECTORS: usize = 32 * 16;

/// The kernel symbol and launch shape for a variant: v2 takes rows of at
/// most 512 16-byte vectors, longer rows go to v1's block-per-row kernel.
fn plan<T: Storage>(
    variant: &str,
    fused: bool,
    d: &RmsNormDims,
) -> Result<(String, LaunchConfig, bool)> {
    let vec = 16 / std::mem::size_of::<T>();
    let base = if fused {
        "fused_add_rmsnorm"
    } else {
        "rmsnorm"
    };
    let v1 = || -> Result<(String, LaunchConfig, bool)> {
        Ok((
            base.to_string(),
            cfg(
                (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
                threads_for(d.hidden.div_ceil(vec), 1024),
            ),
            false,
        ))
    };
    match variant {
        "v1" => v1(),
        "v2" if d.hidden.div_ceil(vec) <= V2_MAX_VECTORS => Ok((
            format!("{base}_v2"),
            cfg(
                (grid_u32(OP, "tokens", d.tokens.div_ceil(V2_ROWS))?, 1, 1),
                (32 * V2_ROWS) as u32,
            ),
            true,
        )),
        "v2" => v1(),
        other => Err(crate::KernelError::Unsupported {
            op: OP,
            what: format!("variant `{other}` (known: {})", VARIANTS.join(", ")),
        }),
    }
}

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

/// Launch `sym` with the arguments every rmsnorm kernel shares.
#[allow(clippy::too_many_arguments)]
fn launch<T: Storage>(
    gpu: &Gpu,
    variant: &str,
    fused: bool,
    out: &mut CudaViewMut<T>,
    residual: Option<&mut CudaViewMut<T>>,
    x: &CudaView<T>,
    weight: &CudaView<T>,
    d: RmsNormDims,
) -> Result<()> {
    let hidden = check(&d, out.len(), x.len(), weight.len())?;
    let (sym, c, rows_arg) = plan::<T>(variant, fused, &d)?;
    if d.tokens == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "rmsnorm", &sym)?;
    let (eps, tokens) = (d.eps, d.tokens as i32);
    // SAFETY: out, x (and residual) hold tokens*hidden elements and weight
    // hidden (checked by the callers and `check`); v1 runs one block per row,
    // v2 one warp per row with row < tokens.
    unsafe {
        let mut b = Launch::new(gpu, &f);
        b.arg(&*out);
        if let Some(r) = residual {
            b.arg(&*r);
        }
        b.arg(x).arg(weight).arg(&eps);
        if rows_arg {
            b.arg(&tokens);
        }
        b.arg(&hidden).launch(c)
    }
    .map_err(crate::KernelError::driver(format!("launch {sym}")))?;
    Ok(())
}

/// out = x * rsqrt(mean(x^2) + eps) * weight, row by row.
/// x, out [tokens, hidden]; weight [hidden].
pub fn rmsnorm<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    x: &CudaView<T>,
    weight: &CudaView<T>,
    d: RmsNormDims,
    variant: &str,
) -> Result<()> {
    launch(gpu, variant, false, out, None, x, weight, d)
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
    variant: &str,
) -> Result<()> {
    check_len(
        OP,
        "residual [tokens, hidden]",
        residual.len(),
        d.tokens * d.hidden,
    )?;
    launch(gpu, variant, true, out, Some(residual), x, weight, d)
}

/// As [`fused_add_rmsnorm`] (v1), with x given as `splits` f32 partial sums
/// (`linear::linear_split_k`'s output): x = round(p[0] + p[1] + ...), summed
/// in split order, then residual = round(x + residual) in place and out =
/// RMSNorm(residual) * weight. partials [splits, tokens, hidden] f32;
/// residual, out [tokens, hidden]; weight [hidden].
pub fn fused_add_rmsnorm_partials<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    residual: &mut CudaViewMut<T>,
    partials: &CudaView<f32>,
    splits: usize,
    weight: &CudaView<T>,
    d: RmsNormDims,
) -> Result<()> {
    let hidden = dim_i32(OP, "hidden", d.hidden)?;
    let splits_i = dim_i32(OP, "splits", splits)?;
    if splits == 0 {
        return Err(crate::KernelError::Unsupported {
            op: OP,
            what: "0 partials (splits must be at least 1)".into(),
        });
    }
    check_len(
        OP,
        "partials [splits, tokens, hidden]",
        partials.len(),
        splits * d.tokens * d.hidden,
    )?;
    check_len(OP, "out [tokens, hidden]", out.len(), d.tokens * d.hidden)?;
    check_len(
        OP,
        "residual [tokens, hidden]",
        residual.len(),
        d.tokens * d.hidden,
    )?;
    check_len(OP, "weight [hidden]", weight.len(), d.hidden)?;
    if d.tokens == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "rmsnorm", "fused_add_rmsnorm_partials")?;
    let vec = 16 / std::mem::size_of::<T>();
    let c = cfg(
        (grid_u32(OP, "tokens", d.tokens)?, 1, 1),
        threads_for(d.hidden.div_ceil(vec), 1024),
    );
    let (eps, stride) = (d.eps, (d.tokens * d.hidden) as i64);
    // SAFETY: lengths checked above; one block per row < tokens, each
    // reading partials[s, row, :] for s < splits and writing its own row.
    unsafe {
        Launch::new(gpu, &f)
            .arg(&*out)
            .arg(&*residual)
            .arg(partials)
            .arg(&splits_i)
            .arg(&stride)
            .arg(weight)
            .arg(&eps)
            .arg(&hidden)
            .launch(c)
    }
    .map_err(crate::KernelError::driver(
        "launch fused_add_rmsnorm_partials",
    ))?;
    Ok(())
}
