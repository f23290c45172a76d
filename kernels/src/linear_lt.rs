//! Linear layers through cuBLASLt, with the algorithm chosen per shape by
//! timing: y [tokens, out] (rows `ldy` apart) = x [tokens, in] · W^T, W
//! [out, in] row-major (Hugging Face layout). Same contract and checks as
//! [`crate::linear::linear`].
//!
//! Layout (column-major, as in `linear.rs`): A = W stored k×m (ld = in) and
//! transposed (m = out, k = in), B = x stored k×n (ld = in, n = tokens),
//! C = D = y stored m×n with ld = ldy. Compute type CUBLAS_COMPUTE_32F for
//! every dtype (bf16/f16 accumulate in f32; f32 is plain f32, never TF32),
//! scale type f32, alpha = 1, beta = 0 (C is never read).
//!
//! Why: at decode batch sizes these GEMMs are latency-bound and cuBLAS's
//! default choice can leave most SMs idle ([256×4864]·[4864×896]^T has only
//! 14 output tiles of 128×128). So for each shape we ask
//! `cublasLtMatmulAlgoGetHeuristic` for up to [`MAX_CANDIDATES`] algorithms
//! (split-K ones included, workspace up to [`WORKSPACE_BYTES`]; for bf16/f16
//! only split-K whose partial sums are reduced in f32) and, when
//! `tokens <= TUNE_MAX_TOKENS` and the stream is not capturing a graph, time
//! each on the caller's buffers and keep the fastest. The descriptors, the
//! layouts and the chosen algorithm are cached per (dtype, m, n, k, ldc,
//! pointer alignments); [`LtLinear::plans`] reports what tuning found.
//!
//! Timing of one candidate: the stream is idle, a few memsets of the
//! workspace give the GPU a head start so that every following launch is
//! already queued when the GPU reaches it (events then measure GPU time, not
//! host launch gaps), 2 warm-up runs, then 10 runs each between its own pair
//! of CUDA events; the median counts. The inputs stay in L2 across runs, as
//! they would not in a model step: the numbers rank algorithms, they are not
//! a model-step time.
//!
//! Under graph capture, a shape seen for the first time uses the heuristic's
//! first algorithm (no synchronisation is allowed while capturing); it is
//! tuned at its first call outside capture. A captured graph keeps the
//! workspace address: the [`LtLinear`] must outlive every graph captured
//! through it.

use crate::device::Gpu;
use crate::dtype::{DType, Storage};
use crate::error::{KernelError, Result};
use crate::linear::check_linear_args;
use cudarc::cublaslt::result::CublasError;
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaEvent, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of_val;

const OP: &str = "linear_lt";

/// Shapes with at most this many tokens are tuned (decode batches: the choice
/// matters and the shapes repeat); larger ones take the heuristic's first.
pub const TUNE_MAX_TOKENS: usize = 512;
/// cuBLASLt workspace, allocated once (NVIDIA's recommendation for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;
/// Heuristic candidates asked for per shape.
pub const MAX_CANDIDATES: usize = 16;
const WARMUP_RUNS: usize = 2;
const TIMED_RUNS: usize = 10;
/// Workspace memsets queued before a candidate's runs (32 MiB each, ~10 µs
/// on an H100): GPU work that lets the host queue the runs ahead of the GPU.
const HEAD_START_MEMSETS: usize = 16;

/// What tuning found for one cached shape.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInfo {
    pub dtype: DType,
    /// out_features.
    pub m: usize,
    /// tokens.
    pub n: usize,
    /// in_features.
    pub k: usize,
    /// Row stride of y (ldy).
    pub ldc: usize,
    /// Algorithms the heuristic returned (at most [`MAX_CANDIDATES`]).
    pub candidates: usize,
    /// Whether the candidates were timed (false: the heuristic's first is in use).
    pub tuned: bool,
    /// Candidates that ran without error when timed (0 if not tuned).
    pub tried: usize,
    /// Index, in heuristic order, of the algorithm in use (0 = heuristic's first).
    pub chosen: usize,
    /// Median µs of the chosen algorithm, when tuned.
    pub best_us: Option<f64>,
    /// Median µs of the heuristic's first algorithm, when tuned and it ran.
    pub heuristic_first_us: Option<f64>,
    /// Median µs per candidate in heuristic order (None: failed or not timed).
    pub candidate_us: Vec<Option<f64>>,
    /// The chosen algorithm's configuration, as cuBLASLt reports it.
    pub config: AlgoConfig,
}

/// A few `CUBLASLT_ALGO_CONFIG_*` attributes of an algorithm (None where the
/// query failed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlgoConfig {
    pub id: Option<i32>,
    pub tile_id: Option<u32>,
    pub stages_id: Option<u32>,
    /// Number of K splits (1 = no split-K).
    pub split_k: Option<u32>,
    pub reduction_scheme: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    m: i32,
    n: i32,
    k: i32,
    ldc: i32,
    /// Alignment in bytes (capped at 256) of the A, B and C/D pointers: the
    /// heuristic only returns algorithms valid for these, so a plan chosen for
    /// aligned buffers is never reused for less aligned ones.
    align: [u32; 3],
}

/// An owned `cublasLtMatmulDesc_t`, destroyed on drop.
struct MatmulDesc(sys::cublasLtMatmulDesc_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cublasLtMatmulDescCreate, owned here alone and
            // destroyed once. The status is ignored: nothing to do on failure.
            let _ = unsafe { sys::cublasLtMatmulDescDestroy(self.0) };
        }
    }
}

/// An owned `cublasLtMatrixLayout_t`, destroyed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Drop for Layout {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cublasLtMatrixLayoutCreate, owned here alone
            // and destroyed once.
            let _ = unsafe { sys::cublasLtMatrixLayoutDestroy(self.0) };
        }
    }
}

/// An owned `cublasLtMatmulPreference_t`, destroyed on drop.
struct Preference(sys::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cublasLtMatmulPreferenceCreate, owned here
            // alone and destroyed once.
            let _ = unsafe { sys::cublasLtMatmulPreferenceDestroy(self.0) };
        }
    }
}

/// The descriptors of one shape: created once, kept while the plan is cached.
struct Descs {
    matmul: MatmulDesc,
    a: Layout,
    b: Layout,
    /// Describes both C and D.
    c: Layout,
}

struct CachedPlan {
    descs: Descs,
    /// The heuristic's candidates, in its order (state SUCCESS, workspace
    /// within ours).
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    algo: sys::cublasLtMatmulAlgo_t,
    info: PlanInfo,
    /// Insertion order, for `plans()`.
    seq: usize,
}

/// cuBLASLt linear layer with a per-shape algorithm cache. Holds a cuBLASLt
/// handle and a [`WORKSPACE_BYTES`] device workspace; use it on the stream
/// of the [`Gpu`] it was created with.
pub struct LtLinear {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, CachedPlan>,
}

// SAFETY: the handle and the descriptors are host objects that cuBLASLt lets
// any thread use as long as calls on them do not race; every call that uses
// them takes `&mut self`, so moving the owner to another thread is sound.
// (No `Sync`: `&self` gives no access to them, but nothing needs it.)
unsafe impl Send for LtLinear {}

/// The call a message names, formatted only when there is an error.
#[derive(Clone, Copy)]
struct What {
    dtype: DType,
    tokens: usize,
    in_features: usize,
    out_features: usize,
    ldy: usize,
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (t, i, o) = (self.tokens, self.in_features, self.out_features);
        write!(f, "{} [{t}x{i}]·[{o}x{i}]^T, ldy {}", self.dtype, self.ldy)
    }
}

/// A cuBLASLt status as [`KernelError::Blas`], `op` naming call and shape.
fn lt_err(op: impl FnOnce() -> String) -> impl FnOnce(CublasError) -> KernelError {
    move |e| KernelError::Blas {
        op: op(),
        msg: format!("{:?}", e.0),
    }
}

fn dtype_of(d: DType) -> sys::cudaDataType {
    match d {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
    }
}

/// Largest power of two dividing `ptr`, capped at 256 bytes.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// The raw pointers of one `linear` call. Built only in [`LtLinear::linear`]
/// from length-checked buffers whose borrows outlive it.
struct Call {
    handle: sys::cublasLtHandle_t,
    stream: sys::cudaStream_t,
    w: *const c_void,
    x: *const c_void,
    y: *mut c_void,
    workspace: *mut c_void,
}

impl Call {
    /// Enqueue D = y = 1 · op(A) · B + 0 · C with `algo`.
    ///
    /// # Safety
    /// `descs` must describe the buffers of this call (as created for its
    /// key), the pointers must be live device allocations of at least the
    /// sizes the layouts imply, and `algo` must come from the heuristic for
    /// these descriptors.
    unsafe fn run(
        &self,
        descs: &Descs,
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> std::result::Result<(), CublasError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        sys::cublasLtMatmul(
            self.handle,
            descs.matmul.0,
            &alpha as *const f32 as *const c_void,
            self.w,
            descs.a.0,
            self.x,
            descs.b.0,
            &beta as *const f32 as *const c_void,
            self.y as *const c_void,
            descs.c.0,
            self.y,
            descs.c.0,
            algo,
            self.workspace,
            WORKSPACE_BYTES,
            self.stream,
        )
        .result()
    }
}

impl LtLinear {
    /// A cuBLASLt handle and the workspace, on `gpu`'s context and stream.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        // SAFETY: only tries to dlopen candidate library names; cudarc would
        // panic at the first symbol if the library were missing.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::MissingLibrary {
                lib: "libcublasLt",
                hint: "install CUDA 12+ cuBLAS (libcublasLt ships with it) and put its lib64 directory on LD_LIBRARY_PATH (e.g. `.gpu/env CMD`)".into(),
            });
        }
        gpu.context()
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let workspace = gpu
            .stream()
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(KernelError::driver("allocate cuBLASLt workspace"))?;
        let mut handle: sys::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer that outlives the call.
        unsafe { sys::cublasLtCreate(&mut handle) }
            .result()
            .map_err(lt_err(|| "cublasLtCreate".into()))?;
        Ok(LtLinear {
            handle,
            workspace,
            plans: HashMap::new(),
        })
    }

    /// What tuning found, one entry per cached shape, in first-use order.
    pub fn plans(&self) -> Vec<PlanInfo> {
        let mut v: Vec<(usize, PlanInfo)> = self
            .plans
            .values()
            .map(|p| (p.seq, p.info.clone()))
            .collect();
        v.sort_by_key(|(s, _)| *s);
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// y[t, 0..out] (rows `ldy` apart) = x [tokens, in] · w^T, w [out, in];
    /// the gap columns out..ldy of y are left untouched. Same contract and
    /// checks as [`crate::linear::linear`]. The first call of a shape picks
    /// (and, for `tokens <= TUNE_MAX_TOKENS` outside graph capture, times)
    /// the algorithm; later calls reuse it.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<T: Storage>(
        &mut self,
        gpu: &Gpu,
        y: &mut CudaViewMut<T>,
        ldy: usize,
        x: &CudaView<T>,
        w: &CudaView<T>,
        tokens: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<()> {
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
        let dtype = T::DTYPE;
        let what = What {
            dtype,
            tokens,
            in_features,
            out_features,
            ldy,
        };
        let stream = gpu.stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        // cuStreamIsCapturing: an invalidated capture is still a capture.
        let capturing = stream
            .capture_status()
            .map_err(KernelError::driver("cuStreamIsCapturing"))?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;

        let (w_ptr, _w_guard) = w.device_ptr(stream);
        let (x_ptr, _x_guard) = x.device_ptr(stream);
        let (y_ptr, _y_guard) = y.device_ptr_mut(stream);
        let (ws_ptr, _ws_guard) = self.workspace.device_ptr_mut(stream);
        let key = Key {
            dtype,
            m: d.m,
            n: d.n,
            k: d.k,
            ldc: d.ldc,
            align: [alignment(w_ptr), alignment(x_ptr), alignment(y_ptr)],
        };
        let call = Call {
            handle: self.handle,
            stream: stream.cu_stream() as sys::cudaStream_t,
            w: w_ptr as *const c_void,
            x: x_ptr as *const c_void,
            y: y_ptr as *mut c_void,
            workspace: ws_ptr as *mut c_void,
        };

        if !self.plans.contains_key(&key) {
            if capturing {
                // Measured on the H200: creating a plan (descriptors and the
                // heuristic query) under capture invalidates the capture.
                return Err(KernelError::Unsupported {
                    op: OP,
                    what: format!(
                        "first call of {what} during CUDA graph capture: call this shape once \
                         outside capture first (that picks and tunes its algorithm)"
                    ),
                });
            }
            let seq = self.plans.len();
            let plan = create_plan(self.handle, key, seq, what)?;
            self.plans.insert(key, plan);
        }
        let Some(plan) = self.plans.get_mut(&key) else {
            return Err(KernelError::Blas {
                op: format!("cuBLASLt plan cache for {what}"),
                msg: "plan missing right after insertion".into(),
            });
        };
        if !plan.info.tuned && !capturing && tokens <= TUNE_MAX_TOKENS {
            tune(gpu, &call, plan, ws_ptr, what)?;
        }
        // SAFETY: `plan.descs` were created for `key`, i.e. for these
        // dimensions, dtype, ldc and pointer alignments; w, x and y hold at
        // least out*in, tokens*in and (tokens-1)*ldy + out elements (checked
        // by check_linear_args), the workspace holds WORKSPACE_BYTES, and
        // all four stay borrowed (guards above) until after the call is
        // enqueued on the stream they belong to. `plan.algo` came from the
        // heuristic for these descriptors.
        unsafe { call.run(&plan.descs, &plan.algo) }
            .map_err(lt_err(|| format!("cublasLtMatmul for {what}")))
    }
}

impl Drop for LtLinear {
    fn drop(&mut self) {
        // Descriptors first (their own Drop), then the handle.
        self.plans.clear();
        if !self.handle.is_null() {
            // SAFETY: created by cublasLtCreate in `new`, destroyed only here.
            let _ = unsafe { sys::cublasLtDestroy(self.handle) };
            self.handle = std::ptr::null_mut();
        }
    }
}

/// Set a descriptor attribute from a plain value.
///
/// # Safety
/// `desc` must be a live matmul descriptor and `V` the attribute's C type.
unsafe fn set_desc_attr<V>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &V,
) -> std::result::Result<(), CublasError> {
    sys::cublasLtMatmulDescSetAttribute(
        desc,
        attr,
        value as *const V as *const c_void,
        size_of_val(value),
    )
    .result()
}

/// Set a preference attribute from a plain value.
///
/// # Safety
/// `pref` must be a live preference and `V` the attribute's C type.
unsafe fn set_pref_attr<V>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    value: &V,
) -> std::result::Result<(), CublasError> {
    sys::cublasLtMatmulPreferenceSetAttribute(
        pref,
        attr,
        value as *const V as *const c_void,
        size_of_val(value),
    )
    .result()
}

fn layout(ty: sys::cudaDataType, rows: i32, cols: i32, ld: i32, what: What) -> Result<Layout> {
    let mut l: sys::cublasLtMatrixLayout_t = std::ptr::null_mut();
    // SAFETY: `l` is a valid out-pointer; rows, cols and ld are positive
    // (dim_i32-checked) and ld >= rows holds for every layout made here.
    unsafe { sys::cublasLtMatrixLayoutCreate(&mut l, ty, rows as u64, cols as u64, ld as i64) }
        .result()
        .map_err(lt_err(|| {
            format!("cublasLtMatrixLayoutCreate({rows}x{cols}, ld {ld}) for {what}")
        }))?;
    Ok(Layout(l))
}

/// Descriptors, layouts and the heuristic's candidates for `key`; the plan
/// starts on the heuristic's first algorithm, untuned.
fn create_plan(
    handle: sys::cublasLtHandle_t,
    key: Key,
    seq: usize,
    what: What,
) -> Result<CachedPlan> {
    use sys::cublasLtMatmulDescAttributes_t as D;
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let ty = dtype_of(key.dtype);
    let (m, n, k, ldc) = (key.m, key.n, key.k, key.ldc);

    let mut desc: sys::cublasLtMatmulDesc_t = std::ptr::null_mut();
    // SAFETY: `desc` is a valid out-pointer. COMPUTE_32F (not _FAST_TF32):
    // f32 inputs are multiplied in full f32.
    unsafe {
        sys::cublasLtMatmulDescCreate(
            &mut desc,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
    }
    .result()
    .map_err(lt_err(|| format!("cublasLtMatmulDescCreate for {what}")))?;
    let matmul = MatmulDesc(desc);
    // cublasOperation_t is an int32 attribute (CUBLAS_OP_T = 1, CUBLAS_OP_N = 0).
    let (op_t, op_n) = (
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32,
        cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32,
    );
    // SAFETY: `matmul` is live; TRANSA/TRANSB take an int32 (cublasOperation_t).
    unsafe {
        set_desc_attr(matmul.0, D::CUBLASLT_MATMUL_DESC_TRANSA, &op_t)
            .and_then(|_| set_desc_attr(matmul.0, D::CUBLASLT_MATMUL_DESC_TRANSB, &op_n))
    }
    .map_err(lt_err(|| {
        format!("cublasLtMatmulDescSetAttribute(TRANSA/TRANSB) for {what}")
    }))?;

    let descs = Descs {
        matmul,
        // W [out, in] row-major = column-major k×m, ld = k; used transposed.
        a: layout(ty, k, m, k, what)?,
        // x [tokens, in] row-major = column-major k×n, ld = k.
        b: layout(ty, k, n, k, what)?,
        // y [tokens, ldy] row-major = column-major m×n, ld = ldc.
        c: layout(ty, m, n, ldc, what)?,
    };

    let mut p: sys::cublasLtMatmulPreference_t = std::ptr::null_mut();
    // SAFETY: `p` is a valid out-pointer.
    unsafe { sys::cublasLtMatmulPreferenceCreate(&mut p) }
        .result()
        .map_err(lt_err(|| {
            format!("cublasLtMatmulPreferenceCreate for {what}")
        }))?;
    let pref = Preference(p);
    let max_ws = WORKSPACE_BYTES as u64;
    // Split-K partial sums must add up in f32: the INPLACE and OUTPUT_TYPE
    // schemes add them in the output type, which for bf16/f16 would round
    // every partial sum (f32 output: INPLACE adds in f32, so it may stay).
    // Unsplit algorithms (scheme NONE) are not filtered by the mask.
    use sys::cublasLtReductionScheme_t as R;
    let reduction_mask: u32 = match key.dtype {
        DType::F32 => {
            R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32
                | R::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32
        }
        DType::BF16 | DType::F16 => R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32,
    };
    let [a_align, b_align, c_align] = key.align;
    // SAFETY: `pref` is live; MAX_WORKSPACE_BYTES is a uint64,
    // REDUCTION_SCHEME_MASK and the MIN_ALIGNMENT_*_BYTES are uint32.
    unsafe {
        set_pref_attr(pref.0, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws)
            .and_then(|_| {
                set_pref_attr(
                    pref.0,
                    P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    &reduction_mask,
                )
            })
            .and_then(|_| {
                set_pref_attr(
                    pref.0,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    &a_align,
                )
            })
            .and_then(|_| {
                set_pref_attr(
                    pref.0,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    &b_align,
                )
            })
            .and_then(|_| {
                set_pref_attr(
                    pref.0,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    &c_align,
                )
            })
            .and_then(|_| {
                set_pref_attr(
                    pref.0,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    &c_align,
                )
            })
    }
    .map_err(lt_err(|| {
        format!("cublasLtMatmulPreferenceSetAttribute for {what}")
    }))?;

    // SAFETY: cublasLtMatmulHeuristicResult_t is plain data (integers,
    // floats and an opaque u64 array), for which all-zero bits are valid.
    let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
        vec![unsafe { std::mem::zeroed() }; MAX_CANDIDATES];
    let mut returned: i32 = 0;
    // SAFETY: every descriptor is live; `results` has room for the
    // MAX_CANDIDATES requested and `returned` is a valid out-pointer.
    unsafe {
        sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            descs.matmul.0,
            descs.a.0,
            descs.b.0,
            descs.c.0,
            descs.c.0,
            pref.0,
            MAX_CANDIDATES as i32,
            results.as_mut_ptr(),
            &mut returned,
        )
    }
    .result()
    .map_err(lt_err(|| {
        format!("cublasLtMatmulAlgoGetHeuristic for {what}")
    }))?;
    let returned = (returned.max(0) as usize).min(MAX_CANDIDATES);
    let candidates: Vec<sys::cublasLtMatmulAlgo_t> = results[..returned]
        .iter()
        .filter(|r| {
            r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && r.workspaceSize <= WORKSPACE_BYTES
        })
        .map(|r| r.algo)
        .collect();
    let Some(&first) = candidates.first() else {
        return Err(KernelError::Blas {
            op: format!("cublasLtMatmulAlgoGetHeuristic for {what}"),
            msg: format!(
                "no usable algorithm ({returned} returned, alignments A/B/C {:?} bytes)",
                key.align
            ),
        });
    };
    let info = PlanInfo {
        dtype: key.dtype,
        m: m as usize,
        n: n as usize,
        k: k as usize,
        ldc: ldc as usize,
        candidates: candidates.len(),
        tuned: false,
        tried: 0,
        chosen: 0,
        best_us: None,
        heuristic_first_us: None,
        candidate_us: vec![None; candidates.len()],
        config: algo_config(&first),
    };
    Ok(CachedPlan {
        descs,
        candidates,
        algo: first,
        info,
        seq,
    })
}

/// One 4-byte `CUBLASLT_ALGO_CONFIG_*` attribute, None if the query fails.
fn config_attr<V: Default>(
    algo: &sys::cublasLtMatmulAlgo_t,
    attr: sys::cublasLtMatmulAlgoConfigAttributes_t,
) -> Option<V> {
    let mut v = V::default();
    let mut written = 0usize;
    // SAFETY: `algo` is a live algorithm struct, `v` a writable buffer of
    // size_of_val(&v) bytes (cuBLASLt checks the size against the attribute's
    // type and fails rather than overrun), `written` a valid out-pointer.
    let st = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            attr,
            &mut v as *mut V as *mut c_void,
            size_of_val(&v),
            &mut written,
        )
    };
    (st == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && written == size_of_val(&v)).then_some(v)
}

fn algo_config(algo: &sys::cublasLtMatmulAlgo_t) -> AlgoConfig {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
    AlgoConfig {
        id: config_attr::<i32>(algo, A::CUBLASLT_ALGO_CONFIG_ID),
        tile_id: config_attr::<u32>(algo, A::CUBLASLT_ALGO_CONFIG_TILE_ID),
        stages_id: config_attr::<u32>(algo, A::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        split_k: config_attr::<u32>(algo, A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        reduction_scheme: config_attr::<u32>(algo, A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
    }
}

/// Time every candidate of `plan` on the call's buffers and keep the fastest.
/// Runs eagerly with synchronisation: never under graph capture.
fn tune(gpu: &Gpu, call: &Call, plan: &mut CachedPlan, ws_ptr: u64, what: What) -> Result<()> {
    let events = (0..TIMED_RUNS)
        .map(|_| Ok((gpu.timing_event()?, gpu.timing_event()?)))
        .collect::<Result<Vec<_>>>()?;
    let mut times = Vec::with_capacity(plan.candidates.len());
    let mut first_err = None;
    for algo in &plan.candidates {
        match time_candidate(gpu, call, &plan.descs, algo, ws_ptr, &events)? {
            Ok(us) => times.push(Some(us)),
            Err(e) => {
                first_err.get_or_insert(e);
                times.push(None);
            }
        }
    }
    let best = times
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let Some((chosen, best_us)) = best else {
        return Err(KernelError::Blas {
            op: format!("cublasLtMatmul (tuning) for {what}"),
            msg: format!(
                "all {} candidate algorithms failed; first error: {:?}",
                times.len(),
                first_err.map(|e| e.0)
            ),
        });
    };
    plan.algo = plan.candidates[chosen];
    plan.info.tuned = true;
    plan.info.tried = times.iter().filter(|t| t.is_some()).count();
    plan.info.chosen = chosen;
    plan.info.best_us = Some(best_us);
    plan.info.heuristic_first_us = times.first().copied().flatten();
    plan.info.config = algo_config(&plan.algo);
    plan.info.candidate_us = times;
    Ok(())
}

/// Median µs of `algo` over TIMED_RUNS runs; `Ok(Err(_))` if cuBLASLt
/// refuses it, `Err` for a driver failure (which poisons everything anyway).
fn time_candidate(
    gpu: &Gpu,
    call: &Call,
    descs: &Descs,
    algo: &sys::cublasLtMatmulAlgo_t,
    ws_ptr: u64,
    events: &[(CudaEvent, CudaEvent)],
) -> Result<std::result::Result<f64, CublasError>> {
    let stream = gpu.stream();
    gpu.synchronize()?;
    for _ in 0..HEAD_START_MEMSETS {
        // SAFETY: ws_ptr is our workspace of WORKSPACE_BYTES (borrowed by the
        // caller for the whole call), on this stream; nothing else reads it.
        unsafe {
            cudarc::driver::result::memset_d8_async(ws_ptr, 0, WORKSPACE_BYTES, stream.cu_stream())
        }
        .map_err(KernelError::driver("cuMemsetD8Async (tuning head start)"))?;
    }
    for _ in 0..WARMUP_RUNS {
        // SAFETY: as for the final call in `LtLinear::linear`: `descs` belong
        // to this call's key, `algo` is one of the heuristic's candidates for
        // them, and the buffers are live and length-checked.
        if let Err(e) = unsafe { call.run(descs, algo) } {
            gpu.synchronize()?;
            return Ok(Err(e));
        }
    }
    for (start, end) in events {
        start
            .record(stream)
            .map_err(KernelError::driver("cuEventRecord"))?;
        // SAFETY: as for the warm-up runs above.
        if let Err(e) = unsafe { call.run(descs, algo) } {
            gpu.synchronize()?;
            return Ok(Err(e));
        }
        end.record(stream)
            .map_err(KernelError::driver("cuEventRecord"))?;
    }
    gpu.synchronize()?;
    let mut us = Vec::with_capacity(events.len());
    for (start, end) in events {
        let ms = start
            .elapsed_ms(end)
            .map_err(KernelError::driver("cuEventElapsedTime"))?;
        us.push(ms as f64 * 1e3);
    }
    Ok(Ok(crate::timing::summarize(us, 1).median_us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_capped_at_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0200), 256);
        assert_eq!(alignment(0x7f00_0000_0080), 128);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0x7f00_0000_0001), 1);
    }

    #[test]
    fn wrong_lengths_are_errors_before_any_gpu_work() {
        // (y_len, ldy, x_len, w_len, tokens, in, out)
        let good = (2 * 8 + 6, 8, 3 * 4, 6 * 4, 3, 4, 6);
        let check = |a: (usize, usize, usize, usize, usize, usize, usize)| {
            check_linear_args(OP, a.0, a.1, a.2, a.3, a.4, a.5, a.6)
        };
        let d = check(good).unwrap().unwrap();
        assert_eq!((d.m, d.n, d.k, d.ldc), (6, 3, 4, 8));
        for (bad, arg) in [
            ((good.0 - 1, 8, 12, 24, 3, 4, 6), "y"),
            ((good.0, 5, 12, 24, 3, 4, 6), "y"),
            ((good.0, 8, 11, 24, 3, 4, 6), "x [tokens, in]"),
            ((good.0, 8, 12, 25, 3, 4, 6), "w [out, in]"),
            ((good.0, 8, 12, 24, 3, 0, 6), "in"),
            ((good.0, 8, 12, 24, 3, 4, 0), "out"),
            ((good.0, usize::MAX, 12, 24, 3, 4, 6), "y"),
        ] {
            match check(bad) {
                Err(KernelError::Shape { op, arg: a, .. }) => {
                    assert_eq!((op, a), (OP, arg), "{bad:?}")
                }
                other => panic!("{bad:?}: expected a Shape error for {arg}, got {other:?}"),
            }
        }
        // No tokens: nothing to do, whatever the buffers.
        assert!(check((0, 8, 0, 24, 0, 4, 6)).unwrap().is_none());
    }
}
