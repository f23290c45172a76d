//! Linear layers through cuBLAS: y [tokens, out] = x [tokens, in] · W^T with
//! W [out, in] as Hugging Face stores it (row-major).
//!
//! cuBLAS is column-major: row-major W [out, in] is column-major W^T with
//! ld = in, and row-major y [tokens, out] is column-major y^T [out, tokens].
//! So y^T = W · x^T is one GEMM with A = W transposed (m = out, k = in),
//! B = x untransposed (n = tokens), ldc = the row stride of y, which may
//! exceed `out`: gate and up write side by side into one [tokens, 2I] buffer.
//! bf16/f16 accumulate in f32 (cublasGemmEx, CUBLAS_COMPUTE_32F).

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::{dim_i32, KernelError, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaView, CudaViewMut};

const OP: &str = "linear";

/// The GEMM dimensions of a checked linear call: m = out, n = tokens,
/// k = in, ldc = ldy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinearDims {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ldc: i32,
}

/// The argument checks of [`linear`] (shared with `linear_lt`), on lengths
/// only, before any GPU work: `Ok(None)` when there is nothing to compute
/// (tokens = 0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_linear_args(
    op: &'static str,
    y_len: usize,
    ldy: usize,
    x_len: usize,
    w_len: usize,
    tokens: usize,
    in_features: usize,
    out_features: usize,
) -> Result<Option<LinearDims>> {
    let (m, k) = (
        dim_i32(op, "out", out_features)?,
        dim_i32(op, "in", in_features)?,
    );
    if tokens == 0 {
        return Ok(None);
    }
    let n = dim_i32(op, "tokens", tokens)?;
    // Saturating: an overflowing product can never match a real length.
    let x_need = tokens.saturating_mul(in_features);
    let w_need = out_features.saturating_mul(in_features);
    crate::error::check_len(op, "x [tokens, in]", x_len, x_need)?;
    crate::error::check_len(op, "w [out, in]", w_len, w_need)?;
    let y_need = (tokens - 1)
        .saturating_mul(ldy)
        .saturating_add(out_features);
    if ldy < out_features || y_len < y_need {
        return Err(KernelError::shape(
            op,
            "y",
            format!("{tokens} rows of {out_features} at stride {ldy}"),
            y_len,
        ));
    }
    let ldc = dim_i32(op, "ldy", ldy)?;
    Ok(Some(LinearDims { m, n, k, ldc }))
}

/// y[t, 0..out] (rows `ldy` apart) = x [tokens, in] · w^T, w [out, in].
#[allow(clippy::too_many_arguments)]
pub fn linear<T: Storage>(
    gpu: &Gpu,
    y: &mut CudaViewMut<T>,
    ldy: usize,
    x: &CudaView<T>,
    w: &CudaView<T>,
    tokens: usize,
    in_features: usize,
    out_features: usize,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let Some(d) = check_linear_args(
        OP,
        y.len(),
        ldy,
        x.len(),
        w.len(),
        tokens,
        in_features,
        out_features,
    )?
    else {
        return Ok(());
    };
    let (m, n, k) = (d.m, d.n, d.k);
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m,
        n,
        k,
        alpha: T::from_f64(1.0),
        lda: k,
        ldb: k,
        beta: T::from_f64(0.0),
        ldc: d.ldc,
    };
    let blas = gpu.blas()?;
    // SAFETY: A = w (out*in elements, transposed: m = out, k = in, lda = in),
    // B = x (tokens*in, ldb = in), C = y covering tokens rows of `out` at
    // stride ldy: all lengths checked above.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| KernelError::Blas {
        op: format!("cublas gemm {tokens}x{in_features} -> {out_features}"),
        msg: format!("{e:?}"),
    })
}

/// The K split of [`linear_split_k`]: `splits` slices of `in / splits`
/// columns each, when that divides evenly into 8-element (16-byte) pieces.
pub fn split_k_supported<T: Storage>(in_features: usize, splits: usize) -> bool {
    T::DTYPE != crate::dtype::DType::F32
        && splits >= 2
        && in_features % splits == 0
        && (in_features / splits) % 8 == 0
}

/// Split-K as one strided-batched cuBLAS GEMM whose partial sums stay in f32
/// for the next kernel to add: partials[s] [tokens, out] = x[:, s·kc..(s+1)·kc]
/// · w[:, s·kc..(s+1)·kc]^T with kc = in / splits, for s < splits.
/// partials [splits, tokens, out] f32; x [tokens, in]; w [out, in].
///
/// Why: cuBLAS's own split-K (the `down` projection at batch 256) reduces in
/// a separate kernel (3.3 µs per call on the H200); here the reduction
/// happens inside the consumer (`rmsnorm::fused_add_rmsnorm_partials`),
/// which reads the residual stream anyway. The sum order is fixed (s = 0, 1,
/// ...), so the result is the same on every run.
#[allow(clippy::too_many_arguments)]
pub fn linear_split_k<T: Storage>(
    gpu: &Gpu,
    partials: &mut CudaViewMut<f32>,
    x: &CudaView<T>,
    w: &CudaView<T>,
    tokens: usize,
    in_features: usize,
    out_features: usize,
    splits: usize,
) -> Result<()> {
    use cudarc::cublas::sys;
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    const OP: &str = "linear_split_k";
    if !split_k_supported::<T>(in_features, splits) {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!(
                "{} with in = {in_features} in {splits} splits (needs bf16 or f16, \
                 splits >= 2 and in / splits a multiple of 8)",
                T::DTYPE
            ),
        });
    }
    let Some(d) = check_linear_args(
        OP,
        out_features * tokens,
        out_features,
        x.len(),
        w.len(),
        tokens,
        in_features,
        out_features,
    )?
    else {
        return Ok(());
    };
    crate::error::check_len(
        OP,
        "partials [splits, tokens, out]",
        partials.len(),
        splits * tokens * out_features,
    )?;
    let kc = in_features / splits;
    let ty = match T::DTYPE {
        crate::dtype::DType::F16 => sys::cudaDataType::CUDA_R_16F,
        _ => sys::cudaDataType::CUDA_R_16BF,
    };
    let blas = gpu.blas()?;
    let stream = gpu.stream();
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (wp, _r1) = w.device_ptr(stream);
    let (xp, _r2) = x.device_ptr(stream);
    let (pp, _r3) = partials.device_ptr_mut(stream);
    // Column-major view (see the module note): C_s^T [out, tokens] = W_s
    // [out, kc] · x_s^T [kc, tokens]; W_s and x_s are column offsets s·kc
    // into rows of stride `in` (lda = ldb = in), C_s is [tokens, out]
    // row-major at offset s·tokens·out.
    // SAFETY: w holds out*in, x tokens*in and partials splits*tokens*out
    // elements (checked above); every batch s reads columns [s·kc,
    // (s+1)·kc) < in of those rows and writes its own tokens*out block.
    let st = unsafe {
        sys::cublasGemmStridedBatchedEx(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            d.m,
            d.n,
            kc as i32,
            &alpha as *const f32 as *const _,
            wp as *const _,
            ty,
            d.k,
            kc as i64,
            xp as *const _,
            ty,
            d.k,
            kc as i64,
            &beta as *const f32 as *const _,
            pp as *mut _,
            sys::cudaDataType::CUDA_R_32F,
            d.m,
            (tokens * out_features) as i64,
            splits as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(KernelError::Blas {
            op: format!(
                "cublasGemmStridedBatchedEx {tokens}x{in_features} -> {out_features} in {splits} K splits"
            ),
            msg: format!("{st:?}"),
        });
    }
    Ok(())
}
