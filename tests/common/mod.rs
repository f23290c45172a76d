//! Shared by the GPU test files: one device per test binary, used by one test
//! at a time (the checks synchronize the stream they share).

use kernels::Gpu;
use std::sync::{Mutex, MutexGuard, OnceLock};

pub fn gpu() -> MutexGuard<'static, Gpu> {
    static GPU: OnceLock<Mutex<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        let g = Gpu::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"));
        Mutex::new(g)
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}
