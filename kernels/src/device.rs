//! The device context: one CUDA context and stream, the module cache, the
//! cuBLAS handle, timing events and what the device is.

use crate::compile;
use crate::error::{KernelError, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What the workbench reports about the card, next to every number.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub arch: String,
    pub sm_count: i32,
    pub total_mem_bytes: usize,
    pub l2_bytes: i32,
    pub driver_version: i32,
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: OnceLock<CudaBlas>,
    /// Grow-only device scratch for kernels that need a workspace (split-KV
    /// attention's partial results). Grown only outside graph capture: a
    /// captured graph keeps the pointer it saw, so callers size it first.
    scratch: Mutex<Option<CudaSlice<u8>>>,
    scratch_generation: std::sync::atomic::AtomicU64,
    /// Launch the kernels that support it with programmatic dependent launch
    /// (`crate::launch::Launch`); off unless `set_pdl` turned it on.
    pdl: std::sync::atomic::AtomicBool,
}

fn require_lib(present: bool, lib: &'static str, hint: &str) -> Result<()> {
    if present {
        Ok(())
    } else {
        Err(KernelError::MissingLibrary {
            lib,
            hint: hint.to_string(),
        })
    }
}

/// The driver's CUDA version as an integer (13000 = 13.0).
fn driver_version() -> Result<i32> {
    let mut v = 0i32;
    // SAFETY: the driver library was checked present; `v` outlives the call.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(KernelError::driver("cuDriverGetVersion"))?;
    Ok(v)
}

impl Gpu {
    /// Open device `ordinal`. Every library is checked before cudarc touches it,
    /// because cudarc panics on a missing shared library.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: these only try to dlopen candidate names; no symbol is called.
        let (driver, cublas) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
            )
        };
        require_lib(
            driver,
            "libcuda (NVIDIA driver)",
            "this machine has no NVIDIA driver; run on a GPU host with driver 525+ (`nvidia-smi` must work)",
        )?;
        compile::require_nvrtc()?;
        require_lib(
            cublas,
            "libcublas",
            "install CUDA 12+ cuBLAS and put its lib64 directory on LD_LIBRARY_PATH (e.g. `.gpu/env CMD`)",
        )?;
        compile::cuda_include_dir()?;

        let count = match CudaContext::device_count() {
            Err(cudarc::driver::DriverError(
                cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE,
            )) => 0,
            r => r.map_err(KernelError::driver("cuDeviceGetCount"))?,
        };
        if count <= 0 {
            return Err(KernelError::NoDevice);
        }
        if ordinal >= count as usize {
            return Err(KernelError::Unsupported {
                op: "Gpu::new",
                what: format!("device ordinal {ordinal}: only {count} device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(KernelError::driver("cuCtxCreate"))?;
        // One stream, ordered launches: cudarc's per-buffer event tracking adds
        // work per launch and breaks graph capture, and buys nothing here.
        // SAFETY: no buffers exist yet, and everything runs on `stream`.
        unsafe { ctx.disable_event_tracking() };
        // Graph capture fails on the legacy default stream: use a new one.
        let stream = ctx
            .new_stream()
            .map_err(KernelError::driver("cuStreamCreate"))?;

        let cc = ctx
            .compute_capability()
            .map_err(KernelError::driver("compute capability"))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(KernelError::driver("cuDeviceGetAttribute"))
        };
        let info = DeviceInfo {
            name: ctx.name().map_err(KernelError::driver("cuDeviceGetName"))?,
            compute_capability: cc,
            arch: compile::arch_for(cc.0, cc.1),
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            l2_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            total_mem_bytes: ctx
                .total_mem()
                .map_err(KernelError::driver("cuDeviceTotalMem"))?,
            driver_version: driver_version()?,
        };
        Ok(Gpu {
            ctx,
            stream,
            info,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            scratch: Mutex::new(None),
            scratch_generation: std::sync::atomic::AtomicU64::new(0),
            pdl: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Turn programmatic dependent launch on or off for the kernels that
    /// support it (they wait on `griddepcontrol.wait` before touching what
    /// the previous kernel writes, so the launch and their independent
    /// prologue overlap the previous kernel's tail). Needs compute
    /// capability 9.0+; returns whether it is now on.
    pub fn set_pdl(&self, on: bool) -> bool {
        let on = on && self.info.compute_capability.0 >= 9;
        self.pdl.store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// Whether supporting kernels launch with programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"))
    }

    /// The cuBLAS handle, created on first use, bound to the workbench stream.
    pub fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let b = CudaBlas::new(self.stream.clone()).map_err(|e| KernelError::Blas {
            op: "cublasCreate".into(),
            msg: format!("{e:?}"),
        })?;
        Ok(self.blas.get_or_init(|| b))
    }

    /// An event that can time (cudarc's default events have timing disabled).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(KernelError::driver("cuEventCreate"))
    }

    /// The module compiled from `kernels/cuda/<stem>.cu`, compiled on first use.
    pub fn module(&self, stem: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mods.get(stem) {
            return Ok(m.clone());
        }
        let ptx = compile::compile(stem, &self.info.arch, &[])?;
        let m = self
            .ctx
            .load_module(ptx)
            .map_err(KernelError::driver(format!("cuModuleLoadData({stem}.cu)")))?;
        mods.insert(stem, m.clone());
        Ok(m)
    }

    /// Kernel `symbol` of module `stem`, cached.
    pub fn function(&self, stem: &'static str, symbol: &str) -> Result<CudaFunction> {
        {
            let fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = fns.get(symbol) {
                return Ok(f.clone());
            }
        }
        let f = self
            .module(stem)?
            .load_function(symbol)
            .map_err(KernelError::driver(format!(
                "cuModuleGetFunction({symbol})"
            )))?;
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(symbol.to_string(), f.clone());
        Ok(f)
    }

    /// The device scratch, at least `bytes` long (reallocated only to grow).
    pub fn scratch(
        &self,
        bytes: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<u8>>>> {
        let mut g = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_none_or(|b| b.len() < bytes) {
            // Captured CUDA graphs hold the old address: they check this count.
            self.scratch_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            *g = None; // free the old one first
            *g = Some(
                self.stream
                    .alloc_zeros::<u8>(bytes.max(256))
                    .map_err(KernelError::driver("allocate scratch"))?,
            );
        }
        Ok(g)
    }

    /// Bumped each time the scratch is reallocated: a CUDA graph captured
    /// with generation g may replay only while this is still g.
    pub fn scratch_generation(&self) -> u64 {
        self.scratch_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Compile and load every embedded source now (first-use cost out of timings).
    pub fn warm_up_modules(&self) -> Result<()> {
        for (stem, _) in compile::SOURCES.iter().chain(compile::UTIL_SOURCES) {
            self.module(stem)?;
        }
        Ok(())
    }
}
