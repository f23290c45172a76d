//! The engine loop: [`Scheduler::schedule`] → one [`GpuModel::step`] →
//! sampling on the GPU → [`Scheduler::postprocess`], as nano-vllm's
//! `LLMEngine.step` does. The KV pool is sized from the GPU's free memory.
//!
//! Sampling: greedy and plain temperature sampling run on the GPU
//! (Gumbel-max keyed by a per-row seed, so only token ids come back);
//! requests with top-k or top-p fetch their logits row and use the CPU
//! sampler (`sampler.rs`).

use super::config::Qwen2Config;
use super::model::{
    GemmBackend, GpuModel, ModelError, ModelLimits, SeqInput, StepInput, WeightSource, BLOCK_SIZE,
};
use super::sampler::{self, SampleError};
use super::scheduler::{
    BatchKind, ConfigError, Request, RequestError, ScheduleError, Scheduler, SchedulerConfig,
    SeqId, Sequence,
};
use cudarc::cublas::{CudaBlas, Gemm};
use kernels::{Gpu, KernelError, Storage};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::time::Instant;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("engine config: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(
        "the KV cache does not fit: {available_mib} MiB free for it at --gpu-memory-utilization \
         {utilization} ({weights_mib} MiB weights, {workspace_mib} MiB activations); one \
         {max_model_len}-token sequence needs {needed_mib} MiB. Raise the utilization, lower \
         --max-model-len or --max-batched-tokens, or use a smaller model"
    )]
    NoMemory {
        available_mib: i64,
        utilization: f64,
        weights_mib: u64,
        workspace_mib: u64,
        max_model_len: usize,
        needed_mib: u64,
    },
    #[error("--gpu-memory-utilization must be in (0, 1], got {0}")]
    Utilization(f64),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Limits of one engine (nano-vllm's defaults).
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub max_model_len: usize,
    /// Share of the GPU's memory the engine may use in all.
    pub gpu_memory_utilization: f64,
    /// Force the pool size (tests of preemption); `None` sizes it from memory.
    pub num_blocks: Option<usize>,
    /// Replay decode steps from CUDA graphs captured per padded batch size.
    pub cuda_graphs: bool,
    /// Most tokens one split of decode attention covers (0: no cap); see
    /// `GpuModel::decode_split_tokens`.
    pub decode_split_tokens: usize,
    /// Decode attention with the fused bias + RoPE + store prologue (v3f);
    /// see `GpuModel::fused_decode_qkv`.
    pub fused_decode_qkv: bool,
    /// The paged_attention variant of decode (`kernels::paged_attention::VARIANTS`).
    pub decode_attention: &'static str,
    /// The prefill_attention variant of prefill (`kernels::prefill_attention::VARIANTS`).
    pub prefill_attention: &'static str,
    /// The linear layers' GEMM path.
    pub gemm: GemmBackend,
    /// Launch the kernels that support it with programmatic dependent
    /// launch (sm_90+; `kernels::Gpu::set_pdl`): each may start while the
    /// GEMM before it drains. Same results, bit for bit. Off by default: on
    /// the H100 it made the decode step 1% slower (CHALLENGES #20).
    pub pdl: bool,
    /// Decode's o_proj and down GEMMs split K this many ways with the
    /// reduction in the next add + RMSNorm (0 or 1: off); see
    /// `GpuModel::set_split_k`.
    pub split_k: usize,
}

/// The default K split of decode's o_proj and down GEMMs: 2 made the 0.5B
/// decode step 3.6% faster on the H200 (4: 2.1%; 8: 3.5% slower),
/// CHALLENGES #21.
pub const DEFAULT_SPLIT_K: usize = 2;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 512,
            max_batched_tokens: 16384,
            max_model_len: 4096,
            gpu_memory_utilization: 0.9,
            num_blocks: None,
            cuda_graphs: true,
            decode_split_tokens: 0,
            fused_decode_qkv: true,
            decode_attention: kernels::paged_attention::PRODUCTION,
            prefill_attention: kernels::prefill_attention::PRODUCTION,
            gemm: GemmBackend::default(),
            pdl: false,
            split_k: DEFAULT_SPLIT_K,
        }
    }
}

/// What one step ran.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub kind: BatchKind,
    pub seqs: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// A finished sequence with its timings (seconds since the engine started).
#[derive(Clone, Debug)]
pub struct Finished {
    pub seq: Sequence,
    pub first_token_s: f64,
    pub finish_s: f64,
}

pub struct Engine<T> {
    pub model: GpuModel<T>,
    pub sched: Scheduler,
    /// Per-sequence base seed of its GPU draws; a CPU generator for top-k/p.
    seeds: HashMap<SeqId, u64>,
    cpu_rngs: HashMap<SeqId, SmallRng>,
    first_token: HashMap<SeqId, f64>,
    start: Instant,
    cuda_graphs: bool,
    /// Padded decode batch sizes (nano-vllm's: 1, 2, 4, 8, then every 16).
    buckets: Vec<usize>,
}

/// Decode graph sizes up to `max`: 1, 2, 4, 8, 16, 32, ... every 16, and `max`.
pub fn graph_buckets(max: usize) -> Vec<usize> {
    let mut b: Vec<usize> = [1, 2, 4, 8].into_iter().filter(|&x| x < max).collect();
    b.extend((16..max).step_by(16));
    b.push(max);
    b
}

/// Bytes of activations and step inputs the model allocates for `limits`
/// (mirrors `model.rs`'s workspace).
fn workspace_bytes(cfg: &Qwen2Config, limits: &ModelLimits, elem: usize) -> u64 {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qd, kd) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let (t, s) = (limits.max_tokens as u64, limits.max_seqs as u64);
    // residual, hn, proj; qkv; q, attn; gate|up, act
    let per_token = (3 * h + (qd + 2 * kd) + 2 * qd + 3 * i) as u64 * elem as u64 // activations
        + 4 * 4 + 8 // ids, positions, lengths, slots
        + 4 * limits.max_model_len.div_ceil(BLOCK_SIZE) as u64; // block-table row
    let per_seq = (h + cfg.vocab_size) as u64 * elem as u64 + 4 + 4 + 8 + 4;
    t * per_token + s * per_seq
}

impl<T: Storage> Engine<T>
where
    CudaBlas: Gemm<T>,
{
    /// Load the model and size the KV pool: what is left of
    /// `total * utilization` after the memory already in use, the weights,
    /// the workspace and 1 GiB for cuBLAS and the kernel modules.
    pub fn new(
        gpu: &Gpu,
        cfg: &Qwen2Config,
        src: WeightSource<'_>,
        ec: EngineConfig,
    ) -> Result<Self, EngineError> {
        if !(ec.gpu_memory_utilization > 0.0 && ec.gpu_memory_utilization <= 1.0) {
            return Err(EngineError::Utilization(ec.gpu_memory_utilization));
        }
        let elem = T::DTYPE.size_bytes();
        let mut limits = ModelLimits {
            num_blocks: 1,
            max_tokens: ec.max_batched_tokens,
            max_seqs: ec.max_num_seqs,
            max_model_len: ec.max_model_len,
        };
        let block_bytes = cfg.kv_bytes_per_token(elem) * BLOCK_SIZE as u64;
        let weights = cfg.param_count() * elem as u64;
        let workspace = workspace_bytes(cfg, &limits, elem);
        limits.num_blocks = match ec.num_blocks {
            Some(n) => n,
            None => {
                let (free, total) = gpu
                    .context()
                    .mem_get_info()
                    .map_err(KernelError::driver("query free GPU memory"))?;
                let budget = total as f64 * ec.gpu_memory_utilization - (total - free) as f64;
                let left = budget - weights as f64 - workspace as f64 - (1u64 << 30) as f64;
                let blocks = (left.max(0.0) / block_bytes as f64) as usize;
                let need = ec.max_model_len.div_ceil(BLOCK_SIZE);
                if blocks < need {
                    return Err(EngineError::NoMemory {
                        available_mib: (left / (1u64 << 20) as f64) as i64,
                        utilization: ec.gpu_memory_utilization,
                        weights_mib: weights >> 20,
                        workspace_mib: workspace >> 20,
                        max_model_len: ec.max_model_len,
                        needed_mib: (need as u64 * block_bytes) >> 20,
                    });
                }
                blocks
            }
        };
        let sched = Scheduler::new(SchedulerConfig {
            max_num_seqs: ec.max_num_seqs,
            max_batched_tokens: ec.max_batched_tokens,
            max_model_len: ec.max_model_len,
            vocab_size: cfg.vocab_size,
            num_blocks: limits.num_blocks,
            block_size: BLOCK_SIZE,
        })?;
        let mut model = GpuModel::build(gpu, cfg, src, limits)?;
        model.decode_split_tokens = ec.decode_split_tokens;
        model.fused_decode_qkv = ec.fused_decode_qkv;
        model.decode_attention = ec.decode_attention;
        model.prefill_attention = ec.prefill_attention;
        model.set_gemm(gpu, ec.gemm)?;
        gpu.set_pdl(ec.pdl);
        model.set_split_k(gpu, ec.split_k)?;
        Ok(Self {
            model,
            sched,
            seeds: HashMap::new(),
            cpu_rngs: HashMap::new(),
            first_token: HashMap::new(),
            start: Instant::now(),
            cuda_graphs: ec.cuda_graphs,
            buckets: graph_buckets(ec.max_num_seqs.min(ec.max_batched_tokens).max(1)),
        })
    }

    /// Restart the clock TTFT and finish times are measured from.
    pub fn reset_clock(&mut self) {
        self.start = Instant::now();
    }

    /// Validate and queue one request; a bad one is rejected alone.
    pub fn add(&mut self, req: Request) -> Result<SeqId, RequestError> {
        let seed = req.params.seed;
        let rng = req.params.rng();
        let id = self.sched.add(req)?;
        let base = seed.unwrap_or_else(|| SmallRng::from_os_rng().next_u64());
        self.seeds.insert(id, base);
        self.cpu_rngs.insert(id, rng);
        Ok(id)
    }

    pub fn is_finished(&self) -> bool {
        self.sched.is_finished()
    }

    /// Stops a waiting or running sequence between steps: its blocks go back
    /// to the pool and its sampling state is dropped. Returns it with status
    /// `Finished(Aborted)`.
    pub fn abort(&mut self, id: SeqId) -> Result<Sequence, EngineError> {
        let seq = self.sched.abort(id)?;
        self.seeds.remove(&id);
        self.cpu_rngs.remove(&id);
        self.first_token.remove(&id);
        Ok(seq)
    }

    /// One scheduler step on the GPU. `None` when there was nothing to run.
    pub fn step(&mut self, gpu: &Gpu) -> Result<Option<StepStats>, EngineError> {
        let t0 = Instant::now();
        let mut batch = self.sched.schedule()?;
        if batch.kind == BatchKind::Decode {
            // Longest context first: decode attention gives each (sequence,
            // KV head) one CTA in row order, so the longest start first and
            // the short ones fill the tail instead of the reverse. Rows are
            // independent, and postprocess pairs tokens with items in
            // whatever order they come.
            longest_first(&mut batch.items);
        }
        if batch.is_empty() {
            self.sched.postprocess(&batch, &[])?;
            return Ok(None);
        }
        // Host-side inputs: one attention row per token.
        let t = batch.num_tokens();
        let mbps = batch
            .items
            .iter()
            .map(|i| i.block_table.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let (mut tokens, mut positions, mut slots) = (
            Vec::with_capacity(t),
            Vec::with_capacity(t),
            Vec::with_capacity(t),
        );
        let (mut tables, mut lens, mut last) = (
            Vec::with_capacity(t * mbps),
            Vec::with_capacity(t),
            Vec::with_capacity(batch.len()),
        );
        // Prefill steps also give the per-sequence view (prefill kernel).
        let prefill = batch.kind == BatchKind::Prefill;
        let (mut cu, mut kv_lens, mut seq_tables) = (vec![0i32], Vec::new(), Vec::new());
        let mut max_q_len = 0;
        for item in &batch.items {
            // The sequence's block table padded to mbps, built once and
            // repeated for each of its tokens' attention rows.
            let mut row: Vec<i32> = item.block_table.iter().map(|&b| b as i32).collect();
            row.resize(mbps, 0);
            tokens.extend_from_slice(&item.tokens);
            slots.extend_from_slice(&item.slots);
            for p in item.start..item.end {
                positions.push(p as i32);
                lens.push(p as i32 + 1);
                tables.extend_from_slice(&row);
            }
            last.push(tokens.len() as i32 - 1);
            if prefill {
                cu.push(tokens.len() as i32);
                kv_lens.push(item.end as i32);
                seq_tables.extend_from_slice(&row);
                max_q_len = max_q_len.max(item.end - item.start);
            }
        }
        let inp = StepInput {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            tables: &tables,
            mbps,
            lens: &lens,
            last: &last,
            seqs: prefill.then_some(SeqInput {
                cu_seqlens: &cu,
                kv_lens: &kv_lens,
                tables: &seq_tables,
                max_q_len,
            }),
        };
        let bucket = self.buckets.iter().copied().find(|&b| b >= batch.len());
        match (batch.kind, bucket) {
            (BatchKind::Decode, Some(b)) if self.cuda_graphs => {
                if let Err(e) = self.model.step_decode_graph(gpu, &inp, b) {
                    // Eager launches compute the same step; say why once.
                    eprintln!("warning: CUDA graphs off for this engine ({e}); running eagerly");
                    self.cuda_graphs = false;
                    self.model.step(gpu, &inp)?;
                }
            }
            _ => self.model.step(gpu, &inp)?,
        }
        // Per-row sampling: the GPU for greedy / temperature, the CPU
        // sampler for rows with top-k or top-p.
        let mut inv_temp = Vec::with_capacity(batch.len());
        let mut seeds = Vec::with_capacity(batch.len());
        let mut cpu_rows = Vec::new();
        for (row, item) in batch.items.iter().enumerate() {
            let seq = self.sched.sequence(item.seq).ok_or_else(|| {
                ScheduleError::Inconsistent(format!("{} scheduled but unknown", item.seq))
            })?;
            let p = &seq.params;
            if p.top_k > 0 || p.top_p < 1.0 {
                cpu_rows.push(row);
            }
            inv_temp.push(if p.temperature == 0.0 {
                0.0
            } else {
                1.0 / p.temperature
            });
            // A fresh key per generated position: splitmix of (seed, position).
            let base = self.seeds.get(&item.seq).copied().unwrap_or(0);
            seeds.push(splitmix(base ^ splitmix(item.end as u64)));
        }
        let mut sampled = self.model.sample(gpu, &inv_temp, &seeds)?;
        for row in cpu_rows {
            let id = batch.items[row].seq;
            let logits = self.model.logits_host(gpu, row)?;
            let params = self
                .sched
                .sequence(id)
                .map(|s| s.params.clone())
                .unwrap_or_default();
            let rng = self
                .cpu_rngs
                .entry(id)
                .or_insert_with(SmallRng::from_os_rng);
            sampled[row] = sampler::sample(&logits, &params, rng)?;
        }
        let now = self.start.elapsed().as_secs_f64();
        for item in &batch.items {
            self.first_token.entry(item.seq).or_insert(now);
        }
        self.sched.postprocess(&batch, &sampled)?;
        Ok(Some(StepStats {
            kind: batch.kind,
            seqs: batch.len(),
            tokens: t,
            seconds: t0.elapsed().as_secs_f64(),
        }))
    }

    /// Sequences finished since the last call, with their timings.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        let now = self.start.elapsed().as_secs_f64();
        self.sched
            .take_finished()
            .into_iter()
            .map(|seq| {
                self.seeds.remove(&seq.id);
                self.cpu_rngs.remove(&seq.id);
                let first = self.first_token.remove(&seq.id).unwrap_or(now);
                Finished {
                    seq,
                    first_token_s: first,
                    finish_s: now,
                }
            })
            .collect()
    }
}

/// Sorts decode items by context length, longest first (stable, so equal
/// lengths keep the scheduler's order).
pub fn longest_first(items: &mut [super::scheduler::BatchItem]) {
    items.sort_by_key(|i| std::cmp::Reverse(i.end));
}

/// splitmix64: the per-row seeds of the GPU sampler.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_estimate_grows_with_the_limits() {
        let cfg = Qwen2Config::preset("qwen2-0.5b").unwrap();
        let small = ModelLimits {
            num_blocks: 1,
            max_tokens: 16,
            max_seqs: 4,
            max_model_len: 64,
        };
        let big = ModelLimits {
            max_tokens: 16384,
            max_seqs: 512,
            ..small
        };
        let (a, b) = (
            workspace_bytes(&cfg, &small, 2),
            workspace_bytes(&cfg, &big, 2),
        );
        assert!(a > 0 && b > 100 * a, "{a} {b}");
        // 512 rows of bf16 logits alone are 512 * 151936 * 2 bytes.
        assert!(b > 512 * 151_936 * 2);
    }

    #[test]
    fn graph_buckets_cover_every_batch_size() {
        assert_eq!(graph_buckets(1), vec![1]);
        assert_eq!(graph_buckets(8), vec![1, 2, 4, 8]);
        assert_eq!(graph_buckets(40), vec![1, 2, 4, 8, 16, 32, 40]);
        let b = graph_buckets(512);
        assert_eq!(b.len(), 4 + 31 + 1);
        for n in 1..=512 {
            let k = b.iter().find(|&&x| x >= n).unwrap();
            assert!(*k - n < 16, "{n} -> {k}");
        }
    }

    #[test]
    fn decode_rows_go_longest_first_and_ties_keep_their_order() {
        use super::super::scheduler::BatchItem;
        let item = |seq: u64, end: usize| BatchItem {
            seq: SeqId(seq),
            start: end - 1,
            end,
            tokens: vec![1],
            slots: vec![0],
            block_table: vec![0],
        };
        let mut v = vec![item(0, 5), item(1, 900), item(2, 5), item(3, 40)];
        longest_first(&mut v);
        let order: Vec<u64> = v.iter().map(|i| i.seq.0).collect();
        assert_eq!(order, vec![1, 3, 0, 2]);
    }

    #[test]
    fn row_seeds_differ_by_position_and_base() {
        let s = |b: u64, p: u64| splitmix(b ^ splitmix(p));
        assert_ne!(s(1, 10), s(1, 11));
        assert_ne!(s(1, 10), s(2, 10));
        assert_eq!(s(7, 3), s(7, 3));
    }
}
