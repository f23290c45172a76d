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

/// out [n, cols] = src[idx[i], :] for idx [n] (i32); an index outside
/// [0, rows) gives a NaN row on the device.
pub fn gather_rows<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<T>,
    src: &CudaView<T>,
    idx: &CudaView<i32>,
    cols: usize,
) -> Result<()> {
    const OP: &str = "gather_rows";
    let n = idx.len();
    crate::error::check_len(OP, "out [n, cols]", out.len(), n * cols)?;
    if cols == 0 || src.len() % cols != 0 {
        return Err(KernelError::Shape {
            op: OP,
            arg: "src [rows, cols]",
            expected: format!("a multiple of cols = {cols}"),
            actual: format!("{} elements", src.len()),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let rows = crate::error::dim_i32(OP, "rows", src.len() / cols)?;
    let c = crate::error::dim_i32(OP, "cols", cols)?;
    let f = typed_function::<T>(gpu, "util", OP)?;
    // SAFETY: out holds n*cols, src rows*cols (checked); one block per output
    // row; source rows are range-checked on the device.
    unsafe {
        crate::launch::Launch::new(gpu, &f)
            .arg(&*out)
            .arg(src)
            .arg(idx)
            .arg(&rows)
            .arg(&c)
            .launch(cfg((crate::launch::grid_u32(OP, "n", n)?, 1, 1), 128))
    }
    .map_err(KernelError::driver("launch gather_rows"))?;
    Ok(())
}

/// One token id per row of logits [n, ld] (first `vocab` columns): greedy
/// where inv_temp[i] == 0, else a Gumbel-max draw from softmax(logits / T)
/// keyed by seeds[i] (deterministic per seed). Writes out [n] (i32).
#[allow(clippy::too_many_arguments)]
pub fn sample_rows<T: Storage>(
    gpu: &Gpu,
    out: &mut CudaViewMut<i32>,
    logits: &CudaView<T>,
    ld: usize,
    vocab: usize,
    inv_temp: &CudaView<f32>,
    seeds: &CudaView<u64>,
) -> Result<()> {
    const OP: &str = "sample_rows";
    let n = out.len();
    crate::error::check_len(OP, "logits [n, ld]", logits.len(), n * ld)?;
    crate::error::check_len(OP, "inv_temp [n]", inv_temp.len(), n)?;
    crate::error::check_len(OP, "seeds [n]", seeds.len(), n)?;
    if vocab == 0 || vocab > ld {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("vocab {vocab} with row stride {ld}"),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let v = crate::error::dim_i32(OP, "vocab", vocab)?;
    let ld = ld as i64;
    let f = typed_function::<T>(gpu, "util", OP)?;
    // SAFETY: lengths checked above; one block per row reads columns < vocab <= ld.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(out)
            .arg(logits)
            .arg(&ld)
            .arg(&v)
            .arg(inv_temp)
            .arg(seeds)
            .launch(cfg((crate::launch::grid_u32(OP, "n", n)?, 1, 1), 512))
    }
    .map_err(KernelError::driver("launch sample_rows"))?;
    Ok(())
}

/// q [rows, qd], k [rows, kd], v [rows, kd] = split(qkv [rows, qd + 2kd] +
/// bias [qd + 2kd]). The engine no longer calls it: `qkv_rope_kv_store`
/// does the same bias add inside its pass. It stays as the first half of the
/// two-kernel path that `tests/rope_kv_store_fused.rs` holds the fused
/// kernel bit-identical to.
#[allow(clippy::too_many_arguments)]
pub fn split_qkv_bias<T: Storage>(
    gpu: &Gpu,
    q: &mut CudaViewMut<T>,
    k: &mut CudaViewMut<T>,
    v: &mut CudaViewMut<T>,
    qkv: &CudaView<T>,
    bias: &CudaView<T>,
    rows: usize,
    qd: usize,
    kd: usize,
) -> Result<()> {
    const OP: &str = "split_qkv_bias";
    let w = qd + 2 * kd;
    crate::error::check_len(OP, "qkv [rows, qd + 2kd]", qkv.len(), rows * w)?;
    crate::error::check_len(OP, "bias [qd + 2kd]", bias.len(), w)?;
    crate::error::check_len(OP, "q [rows, qd]", q.len(), rows * qd)?;
    crate::error::check_len(OP, "k [rows, kd]", k.len(), rows * kd)?;
    crate::error::check_len(OP, "v [rows, kd]", v.len(), rows * kd)?;
    if rows * w == 0 {
        return Ok(());
    }
    let f = typed_function::<T>(gpu, "util", OP)?;
    let (r, qd_i, kd_i) = (
        rows as i64,
        crate::error::dim_i32(OP, "qd", qd)?,
        crate::error::dim_i32(OP, "kd", kd)?,
    );
    let blocks = (rows * w)
        .div_ceil(256)
        .min(gpu.info().sm_count.max(1) as usize * 16) as u32;
    // SAFETY: every length is checked above; the kernel writes q, k, v only
    // below rows*qd, rows*kd, rows*kd and reads qkv below rows*(qd+2kd).
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(qkv)
            .arg(bias)
            .arg(&r)
            .arg(&qd_i)
            .arg(&kd_i)
            .launch(cfg((blocks, 1, 1), 256))
    }
    .map_err(KernelError::driver("launch split_qkv_bias"))?;
    Ok(())
}
