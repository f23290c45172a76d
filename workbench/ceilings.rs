//! Hardware ceilings measured on the card at run time. Datasheet figures are
//! shown beside them and never used as the denominator.
//!
//! - Bandwidth: the best of a device-to-device `cuMemcpyDtoD` and the tuned
//!   16-byte copy kernel (`cuda/util.cu`) over a sweep of grid shapes, each
//!   on 2 GiB, counting bytes read + bytes written.
//! - Compute: cuBLAS bf16 GEMM (f32 accumulation) at 8192^3, 2*M*N*K flops.

use anyhow::Context;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use half::bf16;
use kernels::timing::{time_eager, time_launches, TimingOpts};
use kernels::{Gpu, KernelError};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ceiling {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ceilings {
    pub gb_per_s: f64,
    pub tflop_per_s: f64,
    /// Every measurement and datasheet figure, for ceilings.csv.
    pub rows: Vec<Ceiling>,
}

fn row(name: &str, value: f64, unit: &str, source: &str) -> Ceiling {
    Ceiling {
        name: name.into(),
        value,
        unit: unit.into(),
        source: source.into(),
    }
}

const COPY_BYTES: usize = 2 << 30;

pub fn measure(gpu: &Gpu) -> anyhow::Result<Ceilings> {
    let mut rows = Vec::new();
    let words = COPY_BYTES / 16;
    let mut src = crate::op::rand_buf::<half::bf16>(gpu, COPY_BYTES / 2, 1, -1.0, 1.0)?;
    let mut dst = gpu
        .stream()
        .alloc_zeros::<u8>(COPY_BYTES)
        .map_err(KernelError::driver("alloc copy buffer"))?;
    // memcpy D2D
    let t = time_eager(
        gpu,
        || {
            let s = unsafe { src.transmute::<u8>(COPY_BYTES) }
                .expect("2 GiB of bf16 is 2 GiB of bytes");
            gpu.stream()
                .memcpy_dtod(&s, &mut dst)
                .map_err(KernelError::driver("cuMemcpyDtoD"))
        },
        10,
    )?;
    let memcpy = 2.0 * COPY_BYTES as f64 / t.median_us / 1e3;
    rows.push(row(
        "bandwidth_memcpy_d2d",
        memcpy,
        "GB/s",
        "cuMemcpyDtoD 2 GiB, read+write, median of 10",
    ));

    // Copy kernel over grid shapes; the best is the kernel ceiling.
    let mut src16 = gpu
        .stream()
        .alloc_zeros::<[u32; 4]>(words)
        .map_err(KernelError::driver("alloc copy buffer"))?;
    {
        let s = unsafe { src.transmute_mut::<[u32; 4]>(words) }.expect("same byte size");
        gpu.stream()
            .memcpy_dtod(&s, &mut src16)
            .map_err(KernelError::driver("cuMemcpyDtoD"))?;
    }
    drop(dst);
    let mut dst16 = gpu
        .stream()
        .alloc_zeros::<[u32; 4]>(words)
        .map_err(KernelError::driver("alloc copy buffer"))?;
    let sms = gpu.info().sm_count.max(1) as u32;
    let mut best = (0.0, String::new());
    for per_sm in [2u32, 4, 8, 16, 32] {
        for threads in [256u32, 512, 1024] {
            if per_sm * threads > 2048 * 8 {
                continue;
            }
            let t = time_launches(
                gpu,
                1,
                |_| kernels::util::copy_vec16(gpu, &mut dst16, &src16, sms * per_sm, threads),
                TimingOpts {
                    min_replays: 10,
                    target_ms: 30.0,
                    ..Default::default()
                },
            )?;
            let gbs = 2.0 * COPY_BYTES as f64 / t.median_us / 1e3;
            if gbs > best.0 {
                best = (gbs, format!("{} blocks x {threads} threads", sms * per_sm));
            }
        }
    }
    rows.push(row(
        "bandwidth_copy_kernel",
        best.0,
        "GB/s",
        &format!(
            "16-byte copy kernel 2 GiB, read+write, best grid {}",
            best.1
        ),
    ));
    drop((src, src16, dst16));

    // cuBLAS bf16 GEMM 8192^3.
    let n = 8192usize;
    let a = crate::op::rand_buf::<bf16>(gpu, n * n, 2, -1.0, 1.0)?;
    let b = crate::op::rand_buf::<bf16>(gpu, n * n, 3, -1.0, 1.0)?;
    let mut c = crate::op::rand_buf::<bf16>(gpu, n * n, 4, -1.0, 1.0)?;
    let blas = gpu.blas()?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: bf16::ONE,
        lda: n as i32,
        ldb: n as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    let t = time_eager(
        gpu,
        || {
            // SAFETY: a, b, c are n*n bf16 buffers, matching m = n = k = lda = ldb = ldc = n.
            unsafe { blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| KernelError::Blas {
                op: "cublasGemmEx bf16 8192^3".into(),
                msg: format!("{e:?}"),
            })
        },
        10,
    )
    .context("timing the cuBLAS GEMM ceiling")?;
    let tflops = 2.0 * (n as f64).powi(3) / t.median_us / 1e6;
    rows.push(row(
        "compute_cublas_bf16_gemm",
        tflops,
        "TFLOP/s",
        "cuBLAS bf16 GEMM 8192^3, f32 accumulate, random inputs, median of 10",
    ));

    let gb_per_s = memcpy.max(best.0);
    rows.push(row(
        "bandwidth",
        gb_per_s,
        "GB/s",
        "ceiling used: best of the two measured bandwidths",
    ));
    rows.push(row(
        "compute",
        tflops,
        "TFLOP/s",
        "ceiling used: measured cuBLAS bf16 GEMM",
    ));
    if gpu.info().name.contains("H100") {
        rows.push(row(
            "datasheet_bandwidth_h100_sxm",
            3350.0,
            "GB/s",
            "NVIDIA H100 SXM datasheet (not used)",
        ));
        rows.push(row(
            "datasheet_bf16_dense_h100_sxm",
            989.0,
            "TFLOP/s",
            "NVIDIA H100 SXM datasheet (not used)",
        ));
    }
    Ok(Ceilings {
        gb_per_s,
        tflop_per_s: tflops,
        rows,
    })
}
