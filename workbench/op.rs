//! What every kernel declares to the workbench: its variants, its check and
//! perf cases, its tolerance per dtype, its traffic model, and how to run one
//! case on the GPU against its CPU reference. `registry::OPS` lists them all;
//! `check`, `list`, the tests and (later) `roofline` iterate that list.

use crate::case::{Case, CaseError};
use crate::compare::{Metrics, Tolerance};
use crate::guard::{Elem, Guarded};
use cudarc::driver::CudaSlice;
use kernels::{DType, Gpu, KernelError, Storage};
use rand::rngs::SmallRng;
use rayon::prelude::*;
use thiserror::Error;

/// One implementation of a kernel. The engine calls the one marked production.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub name: &'static str,
    /// One line on what this version changed.
    pub note: &'static str,
    pub production: bool,
}

/// Deliberate faults, to prove the checker catches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    None,
    /// Do not launch: outputs stay NaN.
    SkipLaunch,
    /// Launch on one row (token, sequence) fewer than the reference computes.
    OneRowFewer,
    /// Rotate each sequence's block table by one entry (paged kernels only).
    ShiftBlockTable,
    /// Write one element past the end of the first output.
    WritePastEnd,
}

impl Sabotage {
    pub const COMMON: &'static [Sabotage] = &[
        Sabotage::SkipLaunch,
        Sabotage::OneRowFewer,
        Sabotage::WritePastEnd,
    ];
    pub const PAGED: &'static [Sabotage] = &[
        Sabotage::SkipLaunch,
        Sabotage::OneRowFewer,
        Sabotage::ShiftBlockTable,
        Sabotage::WritePastEnd,
    ];

    /// Rows to launch on when the reference computes `n`.
    pub fn rows(self, n: usize) -> usize {
        if self == Sabotage::OneRowFewer {
            n.saturating_sub(1)
        } else {
            n
        }
    }

    pub fn launches(self) -> bool {
        self != Sabotage::SkipLaunch
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Case(#[from] CaseError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("reference: {0}")]
    Reference(#[from] reference::ShapeError),
    #[error("{kernel}: unknown variant `{variant}` (known: {known})")]
    Variant {
        kernel: &'static str,
        variant: String,
        known: String,
    },
}

pub trait Op: Sync {
    /// The stem shared by `cuda/<name>.cu`, `src/<name>.rs`, the reference,
    /// the CLI and the report rows.
    fn name(&self) -> &'static str;
    fn about(&self) -> &'static str;
    fn variants(&self) -> &'static [Variant];
    fn dtypes(&self) -> &'static [DType] {
        &DType::ALL
    }
    /// Case keys this kernel reads (`gen` and `seed` are common to all).
    fn keys(&self) -> &'static [&'static str];
    /// Parse every value the kernel needs, so a bad case fails before the GPU.
    fn validate(&self, case: &Case) -> Result<(), CaseError>;
    /// Edge shapes and value regimes.
    fn check_cases(&self) -> Vec<Case>;
    /// Real Qwen2 shapes at decode and prefill sizes.
    fn perf_cases(&self) -> Vec<Case>;
    /// A random small case for the GPU proptests.
    fn random_case(&self, rng: &mut SmallRng) -> Case;
    fn tolerance(&self, dtype: DType) -> Tolerance;
    /// Bytes that must cross device memory: each input read once, each output written once.
    fn bytes_moved(&self, case: &Case, dtype: DType) -> Result<u64, CaseError>;
    fn flops(&self, case: &Case) -> Result<u64, CaseError>;
    fn sabotages(&self) -> &'static [Sabotage] {
        Sabotage::COMMON
    }
    /// Perf inputs for `case` in `sets` independent random sets on the device;
    /// the returned bench launches `variant` on one set. Used by the timing path.
    fn bench(
        &self,
        gpu: &Gpu,
        case: &Case,
        dtype: DType,
        variant: &str,
        sets: usize,
    ) -> Result<Box<dyn Bench>, RunError>;

    /// Run `case` on the GPU and compare with the reference.
    fn run(
        &self,
        gpu: &Gpu,
        case: &Case,
        dtype: DType,
        variant: &str,
        sabotage: Sabotage,
    ) -> Result<Metrics, RunError>;

    /// Check a variant name against this kernel's list.
    fn require_variant(&self, variant: &str) -> Result<(), RunError> {
        if self.variants().iter().any(|v| v.name == variant) {
            Ok(())
        } else {
            Err(RunError::Variant {
                kernel: self.name(),
                variant: variant.into(),
                known: self
                    .variants()
                    .iter()
                    .map(|v| v.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }

    /// All keys a case may carry: the kernel's, plus `gen` and `seed`.
    fn check_keys(&self, case: &Case) -> Result<(), CaseError> {
        let mut known: Vec<&str> = self.keys().to_vec();
        known.extend(["gen", "seed"]);
        case.check_keys(self.name(), &known)?;
        self.validate(case)
    }
}

/// Tolerances for outputs computed in f32 and rounded once to the storage
/// type (bf16 keeps 8 significant bits: half an ulp is 2^-9 relative).
pub fn rounded_once(dtype: DType) -> Tolerance {
    match dtype {
        DType::BF16 => Tolerance {
            atol: 1e-2,
            rtol: 1e-2,
            rel_l2: 5e-3,
        },
        DType::F16 => Tolerance {
            atol: 1e-3,
            rtol: 2e-3,
            rel_l2: 1e-3,
        },
        DType::F32 => Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
            rel_l2: 1e-5,
        },
    }
}

/// The `bench` and `run` methods every [`Op`] has alike: check the variant,
/// then call the op module's `bench_t::<T>(gpu, case, sets, variant)` or
/// `run_t::<T>(gpu, case, sabotage, tolerance, variant)` for the dtype.
/// Invoked inside each op's `impl Op`, where those two functions are in scope.
#[macro_export]
macro_rules! dtype_dispatch {
    () => {
        fn bench(
            &self,
            gpu: &kernels::Gpu,
            case: &$crate::case::Case,
            dtype: kernels::DType,
            variant: &str,
            sets: usize,
        ) -> Result<Box<dyn $crate::op::Bench>, $crate::op::RunError> {
            self.require_variant(variant)?;
            $crate::by_dtype!(dtype, bench_t(gpu, case, sets, variant))
        }

        fn run(
            &self,
            gpu: &kernels::Gpu,
            case: &$crate::case::Case,
            dtype: kernels::DType,
            variant: &str,
            sabotage: $crate::op::Sabotage,
        ) -> Result<$crate::compare::Metrics, $crate::op::RunError> {
            self.require_variant(variant)?;
            $crate::by_dtype!(
                dtype,
                run_t(gpu, case, sabotage, self.tolerance(dtype), variant)
            )
        }
    };
}

/// Call `$f::<T>(args)` with T the storage type of `$dtype`.
#[macro_export]
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            kernels::DType::BF16 => $f::<half::bf16>($($arg),*),
            kernels::DType::F16 => $f::<half::f16>($($arg),*),
            kernels::DType::F32 => $f::<f32>($($arg),*),
        }
    };
}

/// A storage type the checker can guard and poison.
pub trait Stored: Storage + Elem {}
impl<T: Storage + Elem> Stored for T {}

pub fn to_storage<T: Storage>(v: &[f64]) -> Vec<T> {
    v.par_iter().map(|&x| T::from_f64(x)).collect()
}

pub fn to_f64<T: Storage>(v: &[T]) -> Vec<f64> {
    v.par_iter().map(|&x| x.to_f64()).collect()
}

/// Run a row-wise reference over chunks of rows in parallel. `f(rows)` gets
/// a range of rows (tokens, sequences) and returns its `K` outputs; the
/// chunks' outputs are concatenated in order. Rows are independent in every
/// op that uses this, so the result is the same as one call over all rows.
pub fn par_rows<E: Send, const K: usize>(
    rows: usize,
    row_elems: usize,
    f: impl Fn(std::ops::Range<usize>) -> Result<[Vec<f64>; K], E> + Sync,
) -> Result<[Vec<f64>; K], E> {
    let per = (PAR_ELEMS / row_elems.max(1)).max(1);
    let parts: Vec<[Vec<f64>; K]> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|c| f(c * per..((c + 1) * per).min(rows)))
        .collect::<Result<_, E>>()?;
    Ok(std::array::from_fn(|k| {
        parts.iter().flat_map(|p| p[k].iter().copied()).collect()
    }))
}

/// Elements per parallel work item.
const PAR_ELEMS: usize = 1 << 16;

/// Inputs whose guards and contents are verified after the launch.
pub trait Verify {
    fn verify_all(&self, gpu: &Gpu) -> Result<Vec<String>, KernelError>;
}

impl<T: Elem> Verify for Guarded<T> {
    fn verify_all(&self, gpu: &Gpu) -> Result<Vec<String>, KernelError> {
        self.verify(gpu)
    }
}

/// An output to compare: the device buffer, its shape, the reference values.
pub struct Expect<'a, T: Elem> {
    pub buf: &'a mut Guarded<T>,
    pub shape: Vec<usize>,
    pub want: &'a [f64],
    /// Per-element magnitude of the terms summed into each output, where they
    /// can cancel (see [`Metrics::compare_scaled`]); None: the output itself.
    pub scale: Option<&'a [f64]>,
}

/// After the launch: apply a write-past-end sabotage, synchronize, read every
/// output back and compare it, verify every input, and fold it all into one
/// set of metrics.
pub fn finish<T: Stored>(
    gpu: &Gpu,
    sabotage: Sabotage,
    mut outputs: Vec<Expect<'_, T>>,
    inputs: &[&dyn Verify],
    tol: Tolerance,
) -> Result<Metrics, RunError> {
    if sabotage == Sabotage::WritePastEnd {
        if let Some(first) = outputs.first_mut() {
            first.buf.write_past_end(gpu, T::from_f64(1.0))?;
        }
    }
    gpu.synchronize()?;
    let mut total: Option<Metrics> = None;
    for e in outputs {
        let (got, violations) = e.buf.read(gpu)?;
        let mut m =
            Metrics::compare_scaled(e.buf.name, &e.shape, &to_f64(&got), e.want, e.scale, tol);
        violations.into_iter().for_each(|v| m.violation(v));
        total = Some(match total {
            None => m,
            Some(t) => t.merge(m),
        });
    }
    let mut total = total.unwrap_or_default();
    for i in inputs {
        i.verify_all(gpu)?
            .into_iter()
            .for_each(|v| total.violation(v));
    }
    Ok(total)
}

/// The registry's own `&'static str` for a variant name (benches outlive the
/// caller's borrow); unknown names were refused by `require_variant` first.
pub fn static_variant(v: &str) -> &'static str {
    crate::registry::OPS
        .iter()
        .flat_map(|o| o.variants())
        .map(|x| x.name)
        .find(|n| *n == v)
        .unwrap_or("v1")
}

/// Launches one perf case on one of its prepared input sets.
pub trait Bench {
    fn launch(&mut self, gpu: &Gpu, set: usize) -> Result<(), KernelError>;
}

/// A device buffer of `n` uniform values in [lo, hi) (never zeros), filled on the GPU.
pub fn rand_buf<T: Storage>(
    gpu: &Gpu,
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<CudaSlice<T>, KernelError> {
    let mut b = gpu
        .stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(KernelError::driver("alloc perf input"))?;
    kernels::util::fill_random(gpu, &mut b.slice_mut(0..n.max(1)), seed, lo, hi)?;
    Ok(b)
}

/// A host vector on the device (indices: positions, slots, block tables).
pub fn upload<T: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    v: &[T],
) -> Result<CudaSlice<T>, KernelError> {
    gpu.stream()
        .clone_htod(v)
        .map_err(KernelError::driver("upload perf input"))
}
