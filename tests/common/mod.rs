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

/// The f32 little-endian tensor `name` of a safetensors file (the golden
/// tiny Qwen2's), as the engine's `WeightSource::Tensors` wants it.
#[allow(dead_code)] // not every test file that shares this module loads weights
pub fn f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Option<Vec<f32>> {
    let v = st.tensor(name).ok()?;
    Some(
        v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}
