//! Device buffers with guard words and poisoned outputs.
//!
//! Every buffer a check launches on is allocated `len + GUARD` elements long;
//! the kernel gets a view of the first `len`, the tail holds a fixed bit
//! pattern that is read back after the launch. Outputs are filled with NaN
//! before the launch, so an element the kernel never wrote cannot pass.
//! Inputs keep a host copy and are compared bit for bit afterwards: a kernel
//! that scribbles on its inputs fails even if its outputs are right.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use kernels::{Gpu, KernelError};
use rayon::prelude::*;

/// Guard elements after each buffer (64+ bytes for every element type).
pub const GUARD: usize = 32;

/// An element type that can be guarded: a recognizable guard value, a poison
/// value, and bits for exact comparison.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static {
    fn guard() -> Self;
    fn poison() -> Self;
    fn bits(self) -> u64;
}

macro_rules! float_elem {
    ($t:ty, $guard:expr, $nan:expr, $bits:expr) => {
        impl Elem for $t {
            fn guard() -> Self {
                $guard
            }
            fn poison() -> Self {
                $nan
            }
            fn bits(self) -> u64 {
                $bits(self) as u64
            }
        }
    };
}
// Guard values are odd finite numbers no kernel computes by accident.
float_elem!(bf16, bf16::from_bits(0xC5AB), bf16::NAN, bf16::to_bits);
float_elem!(f16, f16::from_bits(0xD5AB), f16::NAN, f16::to_bits);
float_elem!(f32, f32::from_bits(0xC5AB_CDEF), f32::NAN, f32::to_bits);
impl Elem for i32 {
    fn guard() -> Self {
        0x5AB1_CDEF
    }
    fn poison() -> Self {
        i32::MIN
    }
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}
impl Elem for i64 {
    fn guard() -> Self {
        0x5AB1_CDEF_5AB1_CDEF
    }
    fn poison() -> Self {
        i64::MIN
    }
    fn bits(self) -> u64 {
        self as u64
    }
}

/// Check a read-back buffer: the guard tail intact and, for inputs, the body
/// unchanged. Returns one message per problem.
pub fn verify_host<T: Elem>(
    name: &str,
    all: &[T],
    len: usize,
    original: Option<&[T]>,
) -> Vec<String> {
    let mut v = Vec::new();
    let g = T::guard().bits();
    if let Some(i) = all[len..].iter().position(|x| x.bits() != g) {
        v.push(format!(
            "{name}: guard word {i} past the end overwritten (write past the end)"
        ));
    }
    if let Some(orig) = original {
        if let Some(i) = all[..len]
            .par_iter()
            .zip(orig)
            .position_first(|(a, b)| a.bits() != b.bits())
        {
            v.push(format!("{name}: input modified at element {i}"));
        }
    }
    v
}

pub struct Guarded<T: Elem> {
    pub name: &'static str,
    buf: CudaSlice<T>,
    len: usize,
    /// Inputs: the uploaded values, to prove they were not changed.
    original: Option<Vec<T>>,
}

fn upload<T: Elem>(gpu: &Gpu, body: &[T]) -> Result<CudaSlice<T>, KernelError> {
    let mut host = Vec::with_capacity(body.len() + GUARD);
    host.extend_from_slice(body);
    host.extend(std::iter::repeat_n(T::guard(), GUARD));
    gpu.stream()
        .clone_htod(&host)
        .map_err(KernelError::driver("upload"))
}

impl<T: Elem> Guarded<T> {
    /// An input the kernel must not modify.
    pub fn input(gpu: &Gpu, name: &'static str, data: Vec<T>) -> Result<Self, KernelError> {
        Ok(Guarded {
            name,
            buf: upload(gpu, &data)?,
            len: data.len(),
            original: Some(data),
        })
    }

    /// A buffer the kernel reads and writes (in-place ops, caches).
    pub fn inout(gpu: &Gpu, name: &'static str, data: &[T]) -> Result<Self, KernelError> {
        Ok(Guarded {
            name,
            buf: upload(gpu, data)?,
            len: data.len(),
            original: None,
        })
    }

    /// An output, poisoned (NaN for floats) before the launch.
    pub fn output(gpu: &Gpu, name: &'static str, len: usize) -> Result<Self, KernelError> {
        Self::inout(gpu, name, &vec![T::poison(); len])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` elements (n <= len; less only to sabotage a launch).
    pub fn view(&self, n: usize) -> CudaView<'_, T> {
        self.buf.slice(0..n.min(self.len))
    }

    pub fn view_mut(&mut self, n: usize) -> CudaViewMut<'_, T> {
        let n = n.min(self.len);
        self.buf.slice_mut(0..n)
    }

    pub fn full(&self) -> CudaView<'_, T> {
        self.view(self.len)
    }

    pub fn full_mut(&mut self) -> CudaViewMut<'_, T> {
        let n = self.len;
        self.view_mut(n)
    }

    /// Sabotage: write one element just past the end, as an off-by-one kernel would.
    pub fn write_past_end(&mut self, gpu: &Gpu, value: T) -> Result<(), KernelError> {
        let len = self.len;
        let mut tail = self.buf.slice_mut(len..len + 1);
        gpu.stream()
            .memcpy_htod(&[value], &mut tail)
            .map_err(KernelError::driver("sabotage write"))
    }

    /// Read back; returns the body and any guard/input violations.
    pub fn read(&self, gpu: &Gpu) -> Result<(Vec<T>, Vec<String>), KernelError> {
        let mut all = gpu
            .stream()
            .clone_dtoh(&self.buf)
            .map_err(KernelError::driver(format!("read back {}", self.name)))?;
        let violations = verify_host(self.name, &all, self.len, self.original.as_deref());
        all.truncate(self.len);
        Ok((all, violations))
    }

    /// Read back only to verify (inputs).
    pub fn verify(&self, gpu: &Gpu) -> Result<Vec<String>, KernelError> {
        Ok(self.read(gpu)?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_guard<T: Elem>(body: &[T]) -> Vec<T> {
        let mut v = body.to_vec();
        v.extend(std::iter::repeat_n(T::guard(), GUARD));
        v
    }

    #[test]
    fn intact_buffers_pass() {
        let body = [bf16::from_f32(1.0), bf16::from_f32(2.0)];
        assert!(verify_host("x", &with_guard(&body), 2, Some(&body)).is_empty());
    }

    #[test]
    fn a_write_past_the_end_is_caught() {
        let mut all = with_guard(&[1.0f32, 2.0]);
        all[2] = 0.0;
        let v = verify_host("out", &all, 2, None);
        assert_eq!(v.len(), 1);
        assert!(
            v[0].contains("out") && v[0].contains("past the end"),
            "{v:?}"
        );
    }

    #[test]
    fn a_modified_input_is_caught_even_with_nan() {
        let body = [f16::NAN, f16::from_f32(1.0)];
        let mut all = with_guard(&body);
        assert!(
            verify_host("x", &all, 2, Some(&body)).is_empty(),
            "NaN compares by bits"
        );
        all[1] = f16::from_f32(1.5);
        let v = verify_host("x", &all, 2, Some(&body));
        assert!(v[0].contains("input modified at element 1"), "{v:?}");
    }

    #[test]
    fn guards_differ_from_poison() {
        assert_ne!(bf16::guard().bits(), bf16::poison().bits());
        assert_ne!(f16::guard().bits(), f16::poison().bits());
        assert_ne!(f32::guard().bits(), f32::poison().bits());
        assert!(i64::guard() != i64::poison() && i32::guard() != i32::poison());
    }
}
