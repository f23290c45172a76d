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
