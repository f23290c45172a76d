//! Launcher for `cuda/silu_mul.cu`: out = silu(gate) * up.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{check_len, dim_i32, Result};
use crate::launch::{cfg, typed_function, Launch};
use cudarc::driver::{CudaView, CudaViewMut};

const OP: &str = "silu_mul";

/// input [tokens, 2*inter] laid out gate | up; out [tokens, inter].
pub fn silu_mul<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    input: &CudaView<T>,
    tokens: usize,
    inter: usize,
) -> Result<()> {
    let inter_i = dim_i32(OP, "inter", inter)?;
    check_len(
        OP,
        "input [tokens, 2*inter]",
        input.len(),
        tokens * 2 * inter,
    )?;
    check_len(OP, "out [tokens, inter]", out.len(), tokens * inter)?;
    if tokens == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "silu_mul", "silu_mul")?;
    let vec = 16 / std::mem::size_of::<T>();
    let work = (tokens * inter).div_ceil(vec);
    // Grid-stride loop: enough blocks to fill the card several times over.
    let blocks = work
        .div_ceil(256)
        .clamp(1, gpu.info().sm_count.max(1) as usize * 32) as u32;
    let tokens_i = tokens as i64;
    // SAFETY: input holds tokens*2*inter and out tokens*inter elements (checked);
    // the kernel's grid-stride loop stops at tokens*inter outputs.
    unsafe {
        Launch::new(gpu, &f)
            .arg(&*out)
            .arg(input)
            .arg(&tokens_i)
            .arg(&inter_i)
            .launch(cfg((blocks, 1, 1), 256))
    }
    .map_err(crate::KernelError::driver("launch silu_mul"))?;
    Ok(())
}
