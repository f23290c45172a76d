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

/// One prefill step of prompts of `lens` tokens (ids (s·131 + p·17) mod
/// vocab), each prompt on its own run of blocks with room for `room` more
/// tokens: the per-token inputs and the per-sequence ones.
#[allow(dead_code)] // used by the files that step a GpuModel by hand
pub struct PrefillBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i64>,
    pub tables: Vec<i32>,
    pub row_lens: Vec<i32>,
    pub last: Vec<i32>,
    pub cu: Vec<i32>,
    pub kv_lens: Vec<i32>,
    pub seq_tables: Vec<i32>,
    /// Each sequence's block table, padded to `mbps`.
    pub seq_table: Vec<Vec<i32>>,
    pub mbps: usize,
    pub max_q_len: usize,
}

#[allow(dead_code)]
impl PrefillBatch {
    pub fn new(lens: &[usize], vocab: usize, room: usize) -> Self {
        use workbench::engine::model::BLOCK_SIZE;
        let mbps = (lens.iter().max().copied().unwrap_or(0) + room).div_ceil(BLOCK_SIZE);
        let mut b = PrefillBatch {
            tokens: vec![],
            positions: vec![],
            slots: vec![],
            tables: vec![],
            row_lens: vec![],
            last: vec![],
            cu: vec![0],
            kv_lens: vec![],
            seq_tables: vec![],
            seq_table: vec![],
            mbps,
            max_q_len: lens.iter().max().copied().unwrap_or(0),
        };
        let mut next_block = 0;
        for (s, &n) in lens.iter().enumerate() {
            let nb = (n + room).div_ceil(BLOCK_SIZE);
            let table: Vec<i32> = (next_block..next_block + nb).map(|x| x as i32).collect();
            next_block += nb;
            let mut padded = table.clone();
            padded.resize(mbps, 0);
            for p in 0..n {
                b.tokens.push(((s * 131 + p * 17) % vocab) as u32);
                b.positions.push(p as i32);
                b.slots.push(
                    table[p / BLOCK_SIZE] as i64 * BLOCK_SIZE as i64 + (p % BLOCK_SIZE) as i64,
                );
                b.tables.extend_from_slice(&padded);
                b.row_lens.push(p as i32 + 1);
            }
            b.last.push(b.tokens.len() as i32 - 1);
            b.cu.push(b.tokens.len() as i32);
            b.kv_lens.push(n as i32);
            b.seq_tables.extend_from_slice(&padded);
            b.seq_table.push(padded);
        }
        b
    }

    pub fn input(&self) -> workbench::engine::model::StepInput<'_> {
        workbench::engine::model::StepInput {
            tokens: &self.tokens,
            positions: &self.positions,
            slots: &self.slots,
            tables: &self.tables,
            mbps: self.mbps,
            lens: &self.row_lens,
            last: &self.last,
            seqs: Some(workbench::engine::model::SeqInput {
                cu_seqlens: &self.cu,
                kv_lens: &self.kv_lens,
                tables: &self.seq_tables,
                max_q_len: self.max_q_len,
            }),
        }
    }
}

/// Indices of the 5 largest values, largest first.
#[allow(dead_code)]
pub fn top5(v: &[f32]) -> Vec<usize> {
    let mut i: Vec<usize> = (0..v.len()).collect();
    i.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    i.truncate(5);
    i
}

/// ‖a − b‖ / ‖b‖ in f64.
#[allow(dead_code)]
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Step `engine` until every request is done (failing after 10,000 steps)
/// and return the completions of `ids`, in that order.
#[allow(dead_code)]
pub fn run_to_completion<T: kernels::Storage>(
    gpu: &Gpu,
    engine: &mut workbench::engine::runner::Engine<T>,
    ids: &[workbench::engine::scheduler::SeqId],
) -> Vec<Vec<u32>>
where
    kernels::cudarc::cublas::CudaBlas: kernels::cudarc::cublas::Gemm<T>,
{
    let mut done = Vec::new();
    let mut steps = 0;
    while !engine.is_finished() {
        engine.step(gpu).expect("engine step");
        done.extend(engine.take_finished());
        steps += 1;
        assert!(steps < 10_000, "engine does not finish");
    }
    done.extend(engine.take_finished());
    ids.iter()
        .map(|id| {
            done.iter()
                .find(|f| f.seq.id == *id)
                .map(|f| f.seq.completion().to_vec())
                .expect("every request finishes")
        })
        .collect()
}

/// The Qwen2-0.5B preset's layer shapes, cut to 2 layers and a 1024-token
/// vocab: a model that steps in milliseconds with the real kernel shapes.
#[allow(dead_code)]
pub fn small_05b_config() -> workbench::engine::config::Qwen2Config {
    let mut cfg = workbench::engine::config::Qwen2Config::preset("qwen2-0.5b").unwrap();
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 1024;
    cfg
}

/// The engine's GPU model with the Qwen2-0.5B preset's layer shapes, cut to
/// 2 layers and a 1024-token vocab, seeded random bf16 weights (seed 7), and
/// room for 8 sequences of up to 512 tokens in 64 blocks.
#[allow(dead_code)]
pub fn small_05b_model(gpu: &Gpu) -> workbench::engine::model::GpuModel<half::bf16> {
    use workbench::engine::model::{GpuModel, ModelLimits, WeightSource};
    let cfg = small_05b_config();
    let limits = ModelLimits {
        num_blocks: 64,
        max_tokens: 512,
        max_seqs: 8,
        max_model_len: 512,
    };
    GpuModel::<half::bf16>::build(gpu, &cfg, WeightSource::Random { seed: 7 }, limits)
        .expect("random model")
}

/// `qkv_rope_kv_store` into fresh buffers: q_out pre-filled with NaN (so
/// every element must be written), both caches starting as `cache0`.
/// Returns [q_out, k_cache, v_cache] on the device.
#[allow(dead_code)] // used by the fused-kernel tests only
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_kv_store_fresh<T: kernels::Storage>(
    gpu: &Gpu,
    qkv: &cudarc::driver::CudaSlice<T>,
    bias: &cudarc::driver::CudaSlice<T>,
    cache0: &[T],
    positions: &cudarc::driver::CudaSlice<i32>,
    slots: &cudarc::driver::CudaSlice<i64>,
    table: &kernels::rope::RopeTable,
    dims: kernels::rope_kv_store::RopeKvStoreDims,
    variant: &str,
) -> [cudarc::driver::CudaSlice<T>; 3] {
    let s = gpu.stream();
    let mut q = s
        .clone_htod(&vec![
            T::from_f64(f64::NAN);
            dims.tokens * dims.q_heads * dims.head_dim
        ])
        .unwrap();
    let (mut k, mut v) = (s.clone_htod(cache0).unwrap(), s.clone_htod(cache0).unwrap());
    kernels::rope_kv_store::qkv_rope_kv_store(
        gpu,
        kernels::rope_kv_store::QkvRopeKvStoreArgs {
            q_out: &mut q.slice_mut(..),
            qkv: &qkv.slice(..),
            bias: &bias.slice(..),
            k_cache: &mut k.slice_mut(..),
            v_cache: &mut v.slice_mut(..),
            positions: &positions.slice(..),
            slot_mapping: &slots.slice(..),
        },
        table,
        dims,
        variant,
    )
    .unwrap();
    [q, k, v]
}
