//! Small helpers shared by the launchers.

use crate::device::Gpu;
use crate::dtype::Storage;
use crate::error::Result;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError,
    LaunchConfig,
};

/// The kernel symbol for storage type `T`: `base_bf16`, `base_f16`, `base_f32`.
pub(crate) fn typed_function<T: Storage>(
    gpu: &Gpu,
    stem: &'static str,
    base: &str,
) -> Result<CudaFunction> {
    gpu.function(stem, &format!("{base}_{}", T::DTYPE.suffix()))
}

/// Threads per block for a row of `work` items: a multiple of 32 in [32, max].
pub(crate) fn threads_for(work: usize, max: u32) -> u32 {
    let w = work.div_ceil(32).max(1) * 32;
    (w as u32).min(max)
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid sizes are u32 on the device; reject what does not fit instead of truncating.
pub(crate) fn grid_u32(op: &'static str, arg: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| crate::error::KernelError::Shape {
        op,
        arg,
        expected: "<= 2^32 - 1".into(),
        actual: v.to_string(),
    })
}

/// Launch shape of the kernels with one thread per (token, column) and
/// `per_token` columns a token (rope v3/v4, rope_kv_store v2): blocks of
/// (columns, R tokens). `split` (small batches): at most 128 threads a block,
/// a token's columns spread over grid.y, so few tokens still reach many SMs.
/// Otherwise a token's columns in one block (per_token <= 1024), R tokens to
/// about 256 threads.
pub(crate) fn token_columns(
    op: &'static str,
    tokens: usize,
    per_token: usize,
    split: bool,
) -> Result<LaunchConfig> {
    let (cols, target) = if split {
        (per_token.min(128), 128)
    } else {
        (per_token, 256)
    };
    let rows = (target / cols).max(1);
    Ok(LaunchConfig {
        grid_dim: (
            grid_u32(op, "tokens", tokens.div_ceil(rows))?,
            per_token.div_ceil(cols) as u32,
            1,
        ),
        block_dim: (cols as u32, rows as u32, 1),
        shared_mem_bytes: 0,
    })
}

/// Up to this many tokens, the split launch of [`token_columns`] (rope v4,
/// rope_kv_store v2): above it, blocks of whole tokens were 2-8% faster on
/// the H100 (2026-11-26); below it, split blocks won at 72 heads x 1-8 tokens.
pub(crate) const SPLIT_TOKENS: usize = 256;

/// True when every buffer starts on a 16-byte boundary (the vector paths'
/// precondition, checked on the host so the kernel need not branch on it).
pub(crate) fn all_aligned16(gpu: &Gpu, bufs: &[&dyn KernelArg]) -> bool {
    bufs.iter().all(|b| b.slot(gpu.stream()) % 16 == 0)
}

/// One kernel argument as the 8-byte slot `cuLaunchKernelEx` reads it from:
/// a device pointer, or a scalar's bytes (little-endian, low bytes first).
pub(crate) trait KernelArg {
    fn slot(&self, stream: &CudaStream) -> u64;
}

impl<T> KernelArg for CudaView<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for CudaViewMut<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for CudaSlice<T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn slot(&self, _: &CudaStream) -> u64 {
                let mut s = [0u8; 8];
                let b = self.to_le_bytes();
                s[..b.len()].copy_from_slice(&b);
                u64::from_le_bytes(s)
            }
        }
    )*};
}
scalar_arg!(i32, u32, i64, u64, f32);

/// A launch through `cuLaunchKernelEx`, which takes launch attributes that
/// cudarc's builder cannot pass: with `Gpu::pdl()` on, the kernel may start
/// while the previous kernel in the stream drains (programmatic dependent
/// launch). Only kernels that call `pdl_wait()` (common.cuh) before reading
/// anything the previous kernel writes, and before writing anything, may be
/// launched this way.
pub(crate) struct Launch<'a> {
    gpu: &'a Gpu,
    f: &'a CudaFunction,
    slots: Vec<u64>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(gpu: &'a Gpu, f: &'a CudaFunction) -> Self {
        Launch {
            gpu,
            f,
            slots: Vec::with_capacity(24),
        }
    }

    pub(crate) fn arg(&mut self, a: &dyn KernelArg) -> &mut Self {
        self.slots.push(a.slot(self.gpu.stream()));
        self
    }

    /// # Safety
    /// The arguments must be the kernel's, in order, and valid for the
    /// grid (as for cudarc's `LaunchArgs::launch`); the kernel must call
    /// `pdl_wait()` before its first dependent access.
    pub(crate) unsafe fn launch(
        &mut self,
        c: LaunchConfig,
    ) -> std::result::Result<(), DriverError> {
        use cudarc::driver::sys;
        let stream = self.gpu.stream();
        stream.context().bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> = self
            .slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut std::ffi::c_void)
            .collect();
        // SAFETY: a zeroed attribute is a valid plain-data value; only the
        // field for its id is set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.gpu.pdl();
        let conf = sys::CUlaunchConfig {
            gridDimX: c.grid_dim.0,
            gridDimY: c.grid_dim.1,
            gridDimZ: c.grid_dim.2,
            blockDimX: c.block_dim.0,
            blockDimY: c.block_dim.1,
            blockDimZ: c.block_dim.2,
            sharedMemBytes: c.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        // SAFETY: `params` points at one slot per argument, alive for the
        // call; the caller vouches for the arguments (see above).
        unsafe {
            sys::cuLaunchKernelEx(
                &conf,
                self.f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}
