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
    let (m, k) = (
        dim_i32(OP, "out", out_features)?,
        dim_i32(OP, "in", in_features)?,
    );
    if tokens == 0 {
        return Ok(());
    }
    let n = dim_i32(OP, "tokens", tokens)?;
    crate::error::check_len(OP, "x [tokens, in]", x.len(), tokens * in_features)?;
    crate::error::check_len(OP, "w [out, in]", w.len(), out_features * in_features)?;
    if ldy < out_features || y.len() < (tokens - 1) * ldy + out_features {
        return Err(KernelError::shape(
            OP,
            "y",
            format!("{tokens} rows of {out_features} at stride {ldy}"),
            y.len(),
        ));
    }
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
        ldc: dim_i32(OP, "ldy", ldy)?,
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
