//! Launcher for `cuda/silu_mul.cu`: out = silu(gate) * up.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, KernelError, Result};
use crate::launch::{all_aligned16, cfg, grid_u32, typed_function, KernelArg, Launch};
use cudarc::driver::{CudaView, CudaViewMut};

const OP: &str = "silu_mul";

/// The variants, oldest first; the engine uses [`PRODUCTION`].
pub const VARIANTS: &[&str] = &["v1", "v2", "v3", "v4", "v5"];
pub const PRODUCTION: &str = "v5";

/// Threads per block of every variant.
const THREADS: usize = 256;

/// input [tokens, 2*inter] laid out gate | up; out [tokens, inter].
pub fn silu_mul<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    input: &CudaView<T>,
    tokens: usize,
    inter: usize,
    variant: &str,
) -> Result<()> {
    let inter_i = dim_i32(OP, "inter", inter)?;
    check_len(
        OP,
        "input [tokens, 2*inter]",
        input.len(),
        tokens * 2 * inter,
    )?;
    check_len(OP, "out [tokens, inter]", out.len(), tokens * inter)?;
    if !VARIANTS.contains(&variant) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("variant `{variant}` (known: {})", VARIANTS.join(", ")),
        });
    }
    if tokens == 0 {
        return Ok(());
    }
    let vec = 16 / std::mem::size_of::<T>();
    let sms = gpu.info().sm_count.max(1) as usize;
    let vectors = tokens * inter / vec;
    // v2/v3 index in u32 and load whole vectors: other shapes take v1's path.
    let flat_ok = inter % vec == 0
        && (vectors + 4 * THREADS) < u32::MAX as usize
        && all_aligned16(gpu, &[&*out as &dyn KernelArg, input]);
    // v4/v5's grid.y counts runs of 512 vectors of a row (at most 65535).
    let v4_ok = inter % vec == 0 && (inter / vec).div_ceil(512) <= 65535;
    let grid_of_rows = variant == "v4" || variant == "v5";
    let launched = if variant == "v1" || !flat_ok || (grid_of_rows && !v4_ok) {
        let f = typed_function::<T>(gpu, "silu_mul", "silu_mul")?;
        let work = (tokens * inter).div_ceil(vec);
        // Grid-stride loop: enough blocks to fill the card several times over.
        let blocks = work.div_ceil(THREADS).clamp(1, sms * 32) as u32;
        let tokens_i = tokens as i64;
        // SAFETY: input holds tokens*2*inter and out tokens*inter elements
        // (checked); the grid-stride loop stops at tokens*inter outputs.
        unsafe {
            Launch::new(gpu, &f)
                .arg(&*out)
                .arg(input)
                .arg(&tokens_i)
                .arg(&inter_i)
                .launch(cfg((blocks, 1, 1), THREADS as u32))
        }
    } else if grid_of_rows {
        let f = typed_function::<T>(gpu, "silu_mul", &format!("silu_mul_{variant}"))?;
        let per_row = inter / vec;
        let threads = per_row.next_multiple_of(32).min(512);
        let grid = (
            grid_u32(OP, "tokens", tokens)?,
            grid_u32(OP, "inter / vector blocks", per_row.div_ceil(threads))?,
            1,
        );
        // SAFETY: as for v1; each thread checks its vector against inter.
        unsafe {
            Launch::new(gpu, &f)
                .arg(&*out)
                .arg(input)
                .arg(&inter_i)
                .launch(cfg(grid, threads as u32))
        }
    } else {
        // Four vectors per thread once that still leaves a few blocks per SM;
        // below that, one per thread spreads the latency over more SMs.
        let unroll = if vectors >= sms * THREADS * 4 * 4 {
            4
        } else {
            1
        };
        let f = typed_function::<T>(gpu, "silu_mul", &format!("silu_mul_{variant}u{unroll}"))?;
        let blocks = vectors.div_ceil(THREADS * unroll) as u32;
        let (total, per_row) = (vectors as u32, (inter / vec) as u32);
        // SAFETY: as for v1; the kernel masks vector indices >= total, which
        // fits u32 with room for the last block's overhang (checked above).
        unsafe {
            Launch::new(gpu, &f)
                .arg(&*out)
                .arg(input)
                .arg(&total)
                .arg(&per_row)
                .arg(&inter_i)
                .launch(cfg((blocks, 1, 1), THREADS as u32))
        }
    };
    launched.map_err(KernelError::driver(format!("launch silu_mul {variant}")))?;
    Ok(())
}
