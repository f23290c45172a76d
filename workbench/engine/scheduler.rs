//! Continuous batching, as nano-vllm's `scheduler.py` and `sequence.py` do
//! it: requests become [`Sequence`]s that wait, run and finish; every step
//! is either one prefill batch or one decode batch.
//!
//! - **Admission** ([`Scheduler::add`]) validates a request up front and
//!   rejects only that request, with a [`RequestError`] naming the field.
//! - **Prefill first.** While the head of the waiting queue fits the token
//!   budget (`max_batched_tokens`), the sequence cap (`max_num_seqs`) and
//!   the free KV blocks (its whole prompt), it is admitted; if anything was
//!   admitted the step is a prefill of those prompts. First come, first
//!   served: a head that does not fit blocks the requests behind it, so
//!   short prompts cannot starve a long one. As in nano-vllm, admitting
//!   new work takes priority: running sequences wait out prefill steps.
//! - **Otherwise decode**: every running sequence gets one slot for its
//!   newest token (at most `max_num_seqs` tokens, which the config requires
//!   to be within `max_batched_tokens`). When the pool runs dry, the newest
//!   running sequence (the highest [`SeqId`], i.e. the latest arrival, so
//!   older requests keep their progress) is *preempted by recompute*: its
//!   blocks are freed and it goes back to the front of the waiting queue
//!   with its generated tokens kept, to be prefilled again later as a
//!   longer prompt (vLLM's `PreemptionMode.RECOMPUTE`).
//! - A sequence that could not take one more token even with the whole pool
//!   to itself is finished with [`FinishReason::KvPoolExhausted`] instead of
//!   being preempted forever; a prompt that could never start is rejected at
//!   [`Scheduler::add`]. So `schedule` always makes progress: the oldest
//!   running sequence advances every decode step.
//! - [`Scheduler::postprocess`] appends the sampled tokens and finishes
//!   sequences on EOS (unless `ignore_eos`) or `max_tokens`, freeing their
//!   blocks. Finished sequences are collected by [`Scheduler::take_finished`].
//!
//! Block-manager bookkeeping between steps: a running sequence of `len`
//! tokens has slots for its first `len - 1`; its newest (sampled) token gets
//! its slot in the next decode step, and the last token of a finished
//! sequence never needs one.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::block_manager::{BlockError, BlockManager};
pub use super::block_manager::{SeqId, DEFAULT_BLOCK_SIZE};
use super::sampler::{SamplingParams, SamplingParamsError};

/// Limits of one engine instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Most sequences running at once (and so in one batch).
    pub max_num_seqs: usize,
    /// Most tokens in one batch (the prefill budget).
    pub max_batched_tokens: usize,
    /// Most tokens in one sequence, prompt plus generated.
    pub max_model_len: usize,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// KV-cache blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
}

/// A [`SchedulerConfig`] that cannot work; each names the field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("scheduler config: {field} must be at least 1, got 0")]
    Zero { field: &'static str },
    #[error(
        "scheduler config: max_batched_tokens ({max_batched_tokens}) must be at least \
         max_model_len ({max_model_len}), or a full-length sequence could never be prefilled \
         (there is no chunked prefill)"
    )]
    BudgetBelowModelLen {
        max_batched_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "scheduler config: max_batched_tokens ({max_batched_tokens}) must be at least \
         max_num_seqs ({max_num_seqs}), or a decode step of every running sequence (one token \
         each) would overrun the token budget"
    )]
    BudgetBelowMaxNumSeqs {
        max_batched_tokens: usize,
        max_num_seqs: usize,
    },
    #[error("scheduler config: {0}")]
    Pool(#[from] BlockError),
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("vocab_size", self.vocab_size),
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        // nano-vllm asserts the same: a preempted sequence is recomputed in
        // one prefill, and it can be up to max_model_len long.
        if self.max_batched_tokens < self.max_model_len {
            return Err(ConfigError::BudgetBelowModelLen {
                max_batched_tokens: self.max_batched_tokens,
                max_model_len: self.max_model_len,
            });
        }
        // vLLM checks the same: decode batches every running sequence.
        if self.max_batched_tokens < self.max_num_seqs {
            return Err(ConfigError::BudgetBelowMaxNumSeqs {
                max_batched_tokens: self.max_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            });
        }
        Ok(())
    }
}

/// One generation request. `max_tokens` and `ignore_eos` live in `params`
/// (as in nano-vllm's `SamplingParams`) so there is one place to set them.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The caller's tag, carried to the [`Sequence`] and named in errors.
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// End-of-sequence ids (Qwen2 instruct models have two:
    /// `<|endoftext|>` and `<|im_end|>`); empty means none.
    pub eos: Vec<u32>,
}

/// Why a request was rejected at [`Scheduler::add`]; only that request is
/// affected.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RequestError {
    #[error("request {request}: {source}")]
    Sampling {
        request: u64,
        source: SamplingParamsError,
    },
    #[error("request {request}: prompt is empty")]
    EmptyPrompt { request: u64 },
    #[error(
        "request {request}: prompt token {index} is {token}, outside the vocab of {vocab_size}"
    )]
    PromptTokenOutOfVocab {
        request: u64,
        index: usize,
        token: u32,
        vocab_size: usize,
    },
    #[error("request {request}: eos token {token} is outside the vocab of {vocab_size}")]
    EosOutOfVocab {
        request: u64,
        token: u32,
        vocab_size: usize,
    },
    #[error(
        "request {request}: prompt of {prompt_len} tokens + max_tokens {max_tokens} exceeds \
         max_model_len {max_model_len}"
    )]
    TooLong {
        request: u64,
        prompt_len: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "request {request}: prompt of {prompt_len} tokens needs {blocks_needed} KV blocks to \
         get past its first generated token, but the whole pool has {num_blocks}"
    )]
    ExceedsKvPool {
        request: u64,
        prompt_len: usize,
        blocks_needed: usize,
        num_blocks: usize,
    },
}

impl RequestError {
    /// The request field at fault, as spelled in [`Request`] /
    /// [`SamplingParams`].
    pub fn field(&self) -> &'static str {
        match self {
            Self::Sampling { source, .. } => source.field(),
            Self::EmptyPrompt { .. }
            | Self::PromptTokenOutOfVocab { .. }
            | Self::ExceedsKvPool { .. } => "prompt",
            Self::EosOutOfVocab { .. } => "eos",
            Self::TooLong { .. } => "max_tokens",
        }
    }

    pub fn request(&self) -> u64 {
        match *self {
            Self::Sampling { request, .. }
            | Self::EmptyPrompt { request }
            | Self::PromptTokenOutOfVocab { request, .. }
            | Self::EosOutOfVocab { request, .. }
            | Self::TooLong { request, .. }
            | Self::ExceedsKvPool { request, .. } => request,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// Sampled one of its EOS ids (and `ignore_eos` was off).
    Eos,
    /// Generated `max_tokens` tokens.
    MaxTokens,
    /// [`Scheduler::abort`]ed.
    Aborted,
    /// Outgrew the whole KV pool: even alone it could not take one more
    /// token. Its tokens so far are kept.
    KvPoolExhausted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeqStatus {
    Waiting,
    Running,
    Finished(FinishReason),
}

/// One request's life: its tokens (prompt then generated) and where it is.
/// Its block table is owned by the scheduler's [`BlockManager`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub id: SeqId,
    /// The [`Request::id`] it came from.
    pub request_id: u64,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub status: SeqStatus,
    pub params: SamplingParams,
    pub eos: Vec<u32>,
    /// Times it was preempted (and so recomputed).
    pub num_preemptions: usize,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Never true: a sequence starts from a non-empty prompt.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.num_prompt_tokens]
    }

    /// The generated tokens.
    pub fn completion(&self) -> &[u32] {
        &self.tokens[self.num_prompt_tokens..]
    }

    pub fn num_completion_tokens(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        match self.status {
            SeqStatus::Finished(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Whole prompts (or recomputed sequences), one item per sequence.
    Prefill,
    /// One new token per running sequence.
    Decode,
}

/// One sequence's part of a batch: the token positions `start..end` to run,
/// with their ids and KV slots. The model samples one token from the logits
/// of position `end - 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    pub seq: SeqId,
    pub start: usize,
    pub end: usize,
    /// `[end - start]` token ids at positions `start..end`.
    pub tokens: Vec<u32>,
    /// `[end - start]` cache slots to write those tokens' K/V to.
    pub slots: Vec<i64>,
    /// The sequence's block table after this step's allocation; `end` is
    /// its context length for attention.
    pub block_table: Vec<u32>,
}

/// What the model runs in one step. Hand it back to
/// [`Scheduler::postprocess`] with one sampled token per item.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Step number; postprocess only accepts the batch of the latest step.
    pub step: u64,
    pub kind: BatchKind,
    pub items: Vec<BatchItem>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Empty when nothing could run: all work is done, or this step only
    /// retired sequences.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Tokens the model runs this step.
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.end - i.start).sum()
    }
}

/// A misuse of the step protocol, or (for `Block`, `LeakedBlocks`,
/// `Inconsistent`) a bug in the scheduler's own bookkeeping.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("schedule: batch {step} is still awaiting postprocess")]
    BatchInFlight { step: u64 },
    #[error("postprocess: batch {step} is not the one in flight ({in_flight:?})")]
    StaleBatch { step: u64, in_flight: Option<u64> },
    #[error("postprocess: batch {step} has {items} item(s) but {sampled} sampled token(s)")]
    SampledCountMismatch {
        step: u64,
        items: usize,
        sampled: usize,
    },
    #[error("postprocess: token {token} sampled for {seq} is outside the vocab of {vocab_size}")]
    SampledTokenOutOfVocab {
        seq: SeqId,
        token: u32,
        vocab_size: usize,
    },
    #[error("abort: {seq} is not waiting or running (unknown, or already finished)")]
    UnknownSeq { seq: SeqId },
    #[error(
        "schedule: nothing is running yet only {free} of {total} KV blocks are free (leaked blocks)"
    )]
    LeakedBlocks { free: usize, total: usize },
    #[error("scheduler: inconsistent state: {0}")]
    Inconsistent(String),
    #[error("scheduler: {0}")]
    Block(#[from] BlockError),
}

/// Waiting and running sequences, the KV block pool, and the step protocol
/// `schedule` → run the model → `postprocess`.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    /// Every waiting or running sequence.
    seqs: HashMap<SeqId, Sequence>,
    /// Admission order; preempted sequences return to the front.
    waiting: VecDeque<SeqId>,
    /// Sorted by id, oldest first: decode serves them in this order, so the
    /// ones not yet served in a step are the newest and the preemption
    /// victim is always the last.
    running: Vec<SeqId>,
    finished: Vec<Sequence>,
    next_id: u64,
    next_step: u64,
    in_flight: Option<u64>,
    num_preemptions: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            blocks: BlockManager::new(config.num_blocks, config.block_size)?,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            next_step: 0,
            in_flight: None,
            num_preemptions: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// A waiting or running sequence.
    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Waiting sequences, next to be admitted first.
    pub fn waiting(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    /// Running sequences, oldest first.
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Preemptions since this scheduler was made.
    pub fn num_preemptions(&self) -> usize {
        self.num_preemptions
    }

    /// Nothing waiting or running (finished sequences may still await
    /// [`Self::take_finished`]).
    pub fn is_finished(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Sequences finished since the last call, in the order they finished
    /// (aborted ones are returned by [`Self::abort`] instead).
    pub fn take_finished(&mut self) -> Vec<Sequence> {
        std::mem::take(&mut self.finished)
    }

    /// Checks `req` against the config without admitting it.
    pub fn validate(&self, req: &Request) -> Result<(), RequestError> {
        let request = req.id;
        let c = &self.config;
        req.params
            .validate()
            .map_err(|source| RequestError::Sampling { request, source })?;
        if req.prompt.is_empty() {
            return Err(RequestError::EmptyPrompt { request });
        }
        if let Some((index, &token)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= c.vocab_size)
        {
            return Err(RequestError::PromptTokenOutOfVocab {
                request,
                index,
                token,
                vocab_size: c.vocab_size,
            });
        }
        if let Some(&token) = req.eos.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(RequestError::EosOutOfVocab {
                request,
                token,
                vocab_size: c.vocab_size,
            });
        }
        let prompt_len = req.prompt.len();
        let max_tokens = req.params.max_tokens;
        if prompt_len.saturating_add(max_tokens) > c.max_model_len {
            return Err(RequestError::TooLong {
                request,
                prompt_len,
                max_tokens,
                max_model_len: c.max_model_len,
            });
        }
        // The prompt must be prefilled, and unless one token is all it asks
        // for, the first sampled token needs a slot too. Longer outputs that
        // outgrow the pool are stopped at run time (KvPoolExhausted), since
        // an EOS may well come first.
        let must_cache = prompt_len + usize::from(max_tokens > 1);
        let blocks_needed = self.blocks.blocks_for(must_cache);
        if blocks_needed > self.blocks.num_blocks() {
            return Err(RequestError::ExceedsKvPool {
                request,
                prompt_len,
                blocks_needed,
                num_blocks: self.blocks.num_blocks(),
            });
        }
        Ok(())
    }

    /// Validates `req` and queues it; a rejected request changes nothing.
    pub fn add(&mut self, req: Request) -> Result<SeqId, RequestError> {
        self.validate(&req)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let seq = Sequence {
            id,
            request_id: req.id,
            num_prompt_tokens: req.prompt.len(),
            tokens: req.prompt,
            status: SeqStatus::Waiting,
            params: req.params,
            eos: req.eos,
            num_preemptions: 0,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Picks the next batch. Its slots are reserved until
    /// [`Self::postprocess`] takes it back; scheduling again before that is
    /// an error. An empty batch needs no postprocess.
    pub fn schedule(&mut self) -> Result<Batch, ScheduleError> {
        if let Some(step) = self.in_flight {
            return Err(ScheduleError::BatchInFlight { step });
        }
        let step = self.next_step;
        self.next_step += 1;

        let mut kind = BatchKind::Prefill;
        let mut items = self.schedule_prefill()?;
        if items.is_empty() {
            kind = BatchKind::Decode;
            items = self.schedule_decode()?;
        }
        if items.is_empty() {
            // Decode ran nothing, so nothing is running any more (every
            // running sequence was served, preempted or retired), and the
            // freed blocks may let the head of the queue in.
            kind = BatchKind::Prefill;
            items = self.schedule_prefill()?;
            if items.is_empty() {
                self.retire_unschedulable_head()?;
            }
        }
        if !items.is_empty() {
            self.in_flight = Some(step);
        }
        Ok(Batch { step, kind, items })
    }

    /// Appends `sampled[i]` to the sequence of `batch.items[i]` and retires
    /// the ones that are done. Sequences aborted since `schedule` are
    /// skipped. On error nothing changes, so a corrected call can follow.
    pub fn postprocess(&mut self, batch: &Batch, sampled: &[u32]) -> Result<(), ScheduleError> {
        if batch.items.is_empty() && sampled.is_empty() {
            return Ok(());
        }
        if self.in_flight != Some(batch.step) {
            return Err(ScheduleError::StaleBatch {
                step: batch.step,
                in_flight: self.in_flight,
            });
        }
        if sampled.len() != batch.items.len() {
            return Err(ScheduleError::SampledCountMismatch {
                step: batch.step,
                items: batch.items.len(),
                sampled: sampled.len(),
            });
        }
        let vocab_size = self.config.vocab_size;
        if let Some((item, &token)) = batch
            .items
            .iter()
            .zip(sampled)
            .find(|(_, &t)| t as usize >= vocab_size)
        {
            return Err(ScheduleError::SampledTokenOutOfVocab {
                seq: item.seq,
                token,
                vocab_size,
            });
        }
        self.in_flight = None;
        for (item, &token) in batch.items.iter().zip(sampled) {
            let Some(seq) = self.seqs.get_mut(&item.seq) else {
                continue; // aborted while the batch ran
            };
            seq.tokens.push(token);
            let reason = if !seq.params.ignore_eos && seq.eos.contains(&token) {
                Some(FinishReason::Eos)
            } else if seq.num_completion_tokens() >= seq.params.max_tokens {
                Some(FinishReason::MaxTokens)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.remove_running(item.seq)?;
                let done = self.retire(item.seq, reason)?;
                self.finished.push(done);
            }
        }
        Ok(())
    }

    /// Stops a waiting or running sequence, frees its blocks and returns it
    /// (status `Finished(Aborted)`). Safe while its batch is in flight:
    /// postprocess skips it.
    pub fn abort(&mut self, id: SeqId) -> Result<Sequence, ScheduleError> {
        let status = self
            .seqs
            .get(&id)
            .map(|s| s.status)
            .ok_or(ScheduleError::UnknownSeq { seq: id })?;
        match status {
            SeqStatus::Waiting => self.waiting.retain(|&w| w != id),
            SeqStatus::Running => self.remove_running(id)?,
            SeqStatus::Finished(_) => {
                return Err(ScheduleError::Inconsistent(format!(
                    "{id} is finished but still tracked"
                )))
            }
        }
        self.retire(id, FinishReason::Aborted)
    }

    /// Checks the scheduler's books against the block manager's: every
    /// tracked sequence is in exactly one queue matching its status; waiting
    /// ones hold no blocks; running ones hold slots for all but their newest
    /// token (or all of them while their batch is in flight).
    pub fn check_invariants(&self) -> Result<(), ScheduleError> {
        let bad = |m: String| Err(ScheduleError::Inconsistent(m));
        self.blocks.check_invariants()?;
        if self.waiting.len() + self.running.len() != self.seqs.len() {
            return bad(format!(
                "{} waiting + {} running != {} tracked",
                self.waiting.len(),
                self.running.len(),
                self.seqs.len()
            ));
        }
        if self.running.len() > self.config.max_num_seqs {
            return bad(format!(
                "{} running > max_num_seqs {}",
                self.running.len(),
                self.config.max_num_seqs
            ));
        }
        if self.running.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!("running not sorted by id: {:?}", self.running));
        }
        if self.blocks.num_seqs() != self.running.len() {
            return bad(format!(
                "{} sequences hold blocks but {} are running",
                self.blocks.num_seqs(),
                self.running.len()
            ));
        }
        for &id in &self.waiting {
            match self.seqs.get(&id) {
                Some(s) if s.status == SeqStatus::Waiting && !self.blocks.contains(id) => {}
                s => return bad(format!("waiting {id} is {s:?}")),
            }
        }
        for &id in &self.running {
            let Some(s) = self.seqs.get(&id) else {
                return bad(format!("running {id} is not tracked"));
            };
            if s.status != SeqStatus::Running {
                return bad(format!("running {id} has status {:?}", s.status));
            }
            let cached = self.blocks.num_tokens(id)?;
            let ok = cached + 1 == s.len() || (self.in_flight.is_some() && cached == s.len());
            if !ok {
                return bad(format!(
                    "running {id} has {} tokens but {cached} cached",
                    s.len()
                ));
            }
        }
        Ok(())
    }

    /// Admits waiting sequences in order while they fit.
    fn schedule_prefill(&mut self) -> Result<Vec<BatchItem>, ScheduleError> {
        let mut items = Vec::new();
        let mut budget = self.config.max_batched_tokens;
        while let Some(&id) = self.waiting.front() {
            if self.running.len() >= self.config.max_num_seqs {
                break;
            }
            let len = self.seq(id)?.len();
            if len > budget || !self.blocks.can_allocate(len) {
                break; // first come, first served: no skipping ahead
            }
            self.blocks.allocate(id, len)?;
            let slots = self.blocks.slots(id, 0, len)?;
            let block_table = self.blocks.block_table(id)?.to_vec();
            self.waiting.pop_front();
            let seq = self.seq_mut(id)?;
            seq.status = SeqStatus::Running;
            let tokens = seq.tokens.clone();
            self.insert_running(id);
            budget -= len;
            items.push(BatchItem {
                seq: id,
                start: 0,
                end: len,
                tokens,
                slots,
                block_table,
            });
        }
        Ok(items)
    }

    /// One slot per running sequence, oldest first, preempting the newest
    /// when the pool is dry.
    fn schedule_decode(&mut self) -> Result<Vec<BatchItem>, ScheduleError> {
        let mut items = Vec::with_capacity(self.running.len());
        // running[..i] are served; each pass serves one, or removes one
        // (preempted or retired), so the loop ends.
        let mut i = 0;
        while let Some(&id) = self.running.get(i) {
            if self.blocks.can_append(id) {
                let slot = self.blocks.append_slot(id)?;
                items.push(self.decode_item(id, slot)?);
                i += 1;
                continue;
            }
            let cached = self.blocks.num_tokens(id)?;
            if self.blocks.blocks_for(cached + 1) > self.blocks.num_blocks() {
                // Even alone it cannot take another token; preempting others
                // would only postpone this.
                self.running.remove(i);
                let done = self.retire(id, FinishReason::KvPoolExhausted)?;
                self.finished.push(done);
                continue;
            }
            // Sorted by id with running[..i] served: the last one is the
            // newest and unserved (possibly `id` itself).
            let victim = *self.running.last().ok_or_else(|| {
                ScheduleError::Inconsistent("no running sequence to preempt".into())
            })?;
            self.preempt(victim)?;
        }
        Ok(items)
    }

    fn decode_item(&self, id: SeqId, slot: i64) -> Result<BatchItem, ScheduleError> {
        let seq = self.seq(id)?;
        let len = seq.len();
        let cached = self.blocks.num_tokens(id)?;
        if cached != len {
            return Err(ScheduleError::Inconsistent(format!(
                "{id} has {len} tokens but {cached} slots after append"
            )));
        }
        Ok(BatchItem {
            seq: id,
            start: len - 1,
            end: len,
            tokens: seq.tokens[len - 1..].to_vec(),
            slots: vec![slot],
            block_table: self.blocks.block_table(id)?.to_vec(),
        })
    }

    /// Recompute preemption: drop the KV, keep the tokens, wait at the front.
    fn preempt(&mut self, id: SeqId) -> Result<(), ScheduleError> {
        self.remove_running(id)?;
        self.blocks.free(id)?;
        let seq = self.seq_mut(id)?;
        seq.status = SeqStatus::Waiting;
        seq.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(id);
        Ok(())
    }

    /// Nothing runs and the head of the queue still cannot be admitted. With
    /// the whole pool free that cannot happen for an admitted request, but
    /// if it does, fail that one request rather than spin forever.
    fn retire_unschedulable_head(&mut self) -> Result<(), ScheduleError> {
        if !self.running.is_empty() {
            return Ok(());
        }
        let Some(&id) = self.waiting.front() else {
            return Ok(());
        };
        if self.blocks.num_free() != self.blocks.num_blocks() {
            return Err(ScheduleError::LeakedBlocks {
                free: self.blocks.num_free(),
                total: self.blocks.num_blocks(),
            });
        }
        self.waiting.pop_front();
        let done = self.retire(id, FinishReason::KvPoolExhausted)?;
        self.finished.push(done);
        Ok(())
    }

    /// Forgets a sequence already taken out of its queue, freeing its blocks.
    fn retire(&mut self, id: SeqId, reason: FinishReason) -> Result<Sequence, ScheduleError> {
        if self.blocks.contains(id) {
            self.blocks.free(id)?;
        }
        let mut seq = self
            .seqs
            .remove(&id)
            .ok_or_else(|| ScheduleError::Inconsistent(format!("{id} is not tracked")))?;
        seq.status = SeqStatus::Finished(reason);
        Ok(seq)
    }

    fn insert_running(&mut self, id: SeqId) {
        if let Err(pos) = self.running.binary_search(&id) {
            self.running.insert(pos, id);
        }
    }

    fn remove_running(&mut self, id: SeqId) -> Result<(), ScheduleError> {
        let pos = self
            .running
            .binary_search(&id)
            .map_err(|_| ScheduleError::Inconsistent(format!("{id} is not running")))?;
        self.running.remove(pos);
        Ok(())
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence, ScheduleError> {
        self.seqs
            .get(&id)
            .ok_or_else(|| ScheduleError::Inconsistent(format!("{id} is queued but not tracked")))
    }

    fn seq_mut(&mut self, id: SeqId) -> Result<&mut Sequence, ScheduleError> {
        self.seqs
            .get_mut(&id)
            .ok_or_else(|| ScheduleError::Inconsistent(format!("{id} is queued but not tracked")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const VOCAB: usize = 100;
    const EOS: u32 = 0;

    fn config(num_blocks: usize, block_size: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 256,
            max_model_len: 64,
            vocab_size: VOCAB,
            num_blocks,
            block_size,
        }
    }

    /// A request of `prompt_len` tokens (1, 2, 3, ... so never EOS) that
    /// runs to exactly `max_tokens` tokens.
    fn req(id: u64, prompt_len: usize, max_tokens: usize) -> Request {
        Request {
            id,
            prompt: (0..prompt_len).map(|i| (i % 90) as u32 + 1).collect(),
            params: SamplingParams {
                ignore_eos: true,
                max_tokens,
                ..SamplingParams::greedy()
            },
            eos: vec![EOS],
        }
    }

    /// Checks one batch against the config and the scheduler's state.
    fn check_batch(s: &Scheduler, b: &Batch) {
        let c = s.config();
        assert!(
            b.len() <= c.max_num_seqs,
            "{} items > max_num_seqs",
            b.len()
        );
        assert!(
            b.num_tokens() <= c.max_batched_tokens,
            "{} tokens > max_batched_tokens",
            b.num_tokens()
        );
        let mut seen = std::collections::HashSet::new();
        let mut slots = std::collections::HashSet::new();
        for it in &b.items {
            assert!(seen.insert(it.seq), "{} twice in a batch", it.seq);
            let n = it.end - it.start;
            assert!(n >= 1);
            assert_eq!(it.tokens.len(), n);
            assert_eq!(it.slots.len(), n);
            if b.kind == BatchKind::Decode {
                assert_eq!(n, 1);
            } else {
                assert_eq!(it.start, 0);
            }
            let seq = s.sequence(it.seq).expect("batched seq is tracked");
            assert_eq!(seq.status, SeqStatus::Running);
            assert_eq!(it.end, seq.len());
            assert_eq!(&seq.tokens[it.start..it.end], &it.tokens[..]);
            let bs = c.block_size as i64;
            for (k, &slot) in it.slots.iter().enumerate() {
                let pos = it.start + k;
                let want = it.block_table[pos / c.block_size] as i64 * bs + (pos as i64 % bs);
                assert_eq!(slot, want);
                assert!(slots.insert(slot), "slot {slot} used twice");
            }
        }
    }

    /// Runs to completion with `sampler` choosing each token, checking every
    /// batch and the invariants; panics if not done within `max_steps`.
    fn drive(
        s: &mut Scheduler,
        mut sampler: impl FnMut(&BatchItem) -> u32,
        max_steps: usize,
    ) -> Vec<Sequence> {
        let mut done = Vec::new();
        for _ in 0..max_steps {
            if s.is_finished() {
                done.extend(s.take_finished());
                return done;
            }
            let b = s.schedule().unwrap();
            check_batch(s, &b);
            s.check_invariants().unwrap();
            let sampled: Vec<u32> = b.items.iter().map(&mut sampler).collect();
            s.postprocess(&b, &sampled).unwrap();
            s.check_invariants().unwrap();
            done.extend(s.take_finished());
        }
        panic!("not finished after {max_steps} steps");
    }

    #[test]
    fn prefill_then_decode() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let a = s.add(req(10, 5, 3)).unwrap();
        let b = s.add(req(11, 3, 3)).unwrap();
        assert_eq!((a, b), (SeqId(0), SeqId(1)));

        let p = s.schedule().unwrap();
        assert_eq!(p.kind, BatchKind::Prefill);
        assert_eq!(p.len(), 2);
        assert_eq!((p.items[0].start, p.items[0].end), (0, 5));
        assert_eq!((p.items[1].start, p.items[1].end), (0, 3));
        assert_eq!(p.items[0].block_table.len(), 2);
        check_batch(&s, &p);
        s.postprocess(&p, &[42, 43]).unwrap();
        assert_eq!(s.sequence(a).unwrap().completion(), &[42]);

        let d = s.schedule().unwrap();
        assert_eq!(d.kind, BatchKind::Decode);
        assert_eq!(d.len(), 2);
        assert_eq!((d.items[0].start, d.items[0].end), (5, 6));
        assert_eq!(d.items[0].tokens, vec![42]);
        assert_eq!(d.items[1].tokens, vec![43]);
        check_batch(&s, &d);
        s.postprocess(&d, &[44, 45]).unwrap();
        let d = s.schedule().unwrap();
        s.postprocess(&d, &[46, 47]).unwrap();
        assert!(s.is_finished());
        let done = s.take_finished();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].request_id, 10);
        assert_eq!(done[0].completion(), &[42, 44, 46]);
        assert_eq!(done[0].prompt(), &[1, 2, 3, 4, 5]);
        assert_eq!(done[1].completion(), &[43, 45, 47]);
        assert_eq!(done[0].finish_reason(), Some(FinishReason::MaxTokens));
        assert_eq!(s.block_manager().num_free(), 8);
        // Nothing left: an empty batch, which needs no postprocess.
        let e = s.schedule().unwrap();
        assert!(e.is_empty());
        s.schedule().unwrap();
    }

    #[test]
    fn kv_pool_for_one_sequence_serves_eight_requests() {
        // A full sequence is 6 + 10 = 16 tokens, of which 15 need slots:
        // 4 blocks of 4, the whole pool.
        let mut s = Scheduler::new(SchedulerConfig {
            max_model_len: 16,
            ..config(4, 4)
        })
        .unwrap();
        for r in 0..8 {
            s.add(req(r, 6, 10)).unwrap();
        }
        let done = drive(&mut s, |_| 7, 10_000);
        assert_eq!(done.len(), 8);
        let mut ids: Vec<u64> = done.iter().map(|d| d.request_id).collect();
        ids.sort();
        assert_eq!(ids, (0..8).collect::<Vec<_>>());
        for d in &done {
            assert_eq!(d.finish_reason(), Some(FinishReason::MaxTokens));
            assert_eq!(d.completion(), &[7; 10]);
            assert_eq!(d.prompt(), &[1, 2, 3, 4, 5, 6]);
        }
        assert!(s.num_preemptions() > 0, "expected preemptions");
        assert!(done.iter().any(|d| d.num_preemptions > 0));
        assert_eq!(s.block_manager().num_free(), 4);
        s.block_manager().check_invariants().unwrap();
    }

    #[test]
    fn preemption_takes_the_newest_and_recomputes_its_tokens() {
        let mut s = Scheduler::new(config(4, 2)).unwrap();
        let a = s.add(req(0, 3, 3)).unwrap();
        let b = s.add(req(1, 3, 3)).unwrap();
        let p = s.schedule().unwrap(); // both prompts: 2 blocks each, pool full
        assert_eq!(p.len(), 2);
        s.postprocess(&p, &[50, 60]).unwrap();
        let d = s.schedule().unwrap(); // position 3 fits the second blocks
        assert_eq!((d.kind, d.len()), (BatchKind::Decode, 2));
        s.postprocess(&d, &[51, 61]).unwrap();
        // Position 4 needs a third block for each; none is free, so the
        // newest (b) is preempted and a carries on alone.
        let d = s.schedule().unwrap();
        assert_eq!(d.kind, BatchKind::Decode);
        assert_eq!(d.items.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![a]);
        assert_eq!(s.num_preemptions(), 1);
        let sb = s.sequence(b).unwrap();
        assert_eq!(sb.status, SeqStatus::Waiting);
        assert_eq!(sb.num_preemptions, 1);
        assert_eq!(s.waiting().next(), Some(b));
        s.check_invariants().unwrap();
        s.postprocess(&d, &[52]).unwrap(); // a is done
                                           // b comes back as a 5-token prompt: its generated tokens are kept.
        let p = s.schedule().unwrap();
        assert_eq!(p.kind, BatchKind::Prefill);
        assert_eq!(p.items[0].seq, b);
        assert_eq!((p.items[0].start, p.items[0].end), (0, 5));
        assert_eq!(p.items[0].tokens, vec![1, 2, 3, 60, 61]);
        s.postprocess(&p, &[62]).unwrap();
        let done = s.take_finished();
        assert_eq!(done[0].completion(), &[50, 51, 52]);
        assert_eq!(done[1].completion(), &[60, 61, 62]);
        assert_eq!(done[1].num_completion_tokens(), 3);
        assert!(s.is_finished());
        assert_eq!(s.block_manager().num_free(), 4);
    }

    #[test]
    fn eos_finishes_unless_ignored() {
        let mut s = Scheduler::new(config(16, 4)).unwrap();
        let mut stop = req(0, 4, 10);
        stop.params.ignore_eos = false;
        stop.eos = vec![EOS, 99];
        let go_on = req(1, 4, 3); // ignore_eos
        s.add(stop).unwrap();
        s.add(go_on).unwrap();
        let p = s.schedule().unwrap();
        s.postprocess(&p, &[5, 99]).unwrap();
        let d = s.schedule().unwrap();
        s.postprocess(&d, &[99, 5]).unwrap();
        let done = s.take_finished();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request_id, 0);
        assert_eq!(done[0].finish_reason(), Some(FinishReason::Eos));
        assert_eq!(done[0].completion(), &[5, 99]);
        let rest = drive(&mut s, |_| EOS, 100);
        assert_eq!(rest[0].finish_reason(), Some(FinishReason::MaxTokens));
        assert_eq!(rest[0].completion(), &[99, 5, EOS]);
        assert_eq!(s.block_manager().num_free(), 16);
    }

    #[test]
    fn prompt_that_can_never_fit_is_rejected_up_front() {
        // 2 blocks of 4: a 9-token prompt needs 3 blocks even to start.
        let mut s = Scheduler::new(config(2, 4)).unwrap();
        let e = s.add(req(5, 9, 4)).unwrap_err();
        assert_eq!(
            e,
            RequestError::ExceedsKvPool {
                request: 5,
                prompt_len: 9,
                blocks_needed: 3,
                num_blocks: 2
            }
        );
        assert_eq!(e.field(), "prompt");
        assert!(e.to_string().contains("whole pool has 2"), "{e}");
        // 8 tokens fill the pool; generating past the first token needs a
        // ninth slot, so only max_tokens 1 is admissible.
        assert!(s.add(req(6, 8, 2)).is_err());
        s.add(req(7, 8, 1)).unwrap();
        assert_eq!(s.num_waiting(), 1);
        let done = drive(&mut s, |_| 3, 10);
        assert_eq!(done[0].finish_reason(), Some(FinishReason::MaxTokens));
    }

    #[test]
    fn sequence_outgrowing_the_pool_fails_instead_of_looping() {
        let mut s = Scheduler::new(config(2, 4)).unwrap();
        let big = s.add(req(0, 3, 20)).unwrap(); // would need 22 slots; pool has 8
        let small = s.add(req(1, 2, 2)).unwrap();
        let done = drive(&mut s, |_| 9, 1_000);
        assert_eq!(done.len(), 2);
        let find = |id| done.iter().find(|d| d.id == id).unwrap();
        assert_eq!(find(small).finish_reason(), Some(FinishReason::MaxTokens));
        let b = find(big);
        assert_eq!(b.finish_reason(), Some(FinishReason::KvPoolExhausted));
        // It ran until 8 tokens filled the pool and a ninth needed a slot.
        assert_eq!(b.len(), 9);
        assert_eq!(b.completion(), &[9; 6]);
        // Retired directly, not preempted first (it could never come back).
        assert_eq!(b.num_preemptions, 0);
        assert_eq!(s.num_preemptions(), 0);
        assert_eq!(s.block_manager().num_free(), 2);
    }

    #[test]
    fn unschedulable_head_is_retired_not_spun_on() {
        // Reachable only through corrupted state, so corrupt it by hand: a
        // waiting sequence longer than the whole pool.
        let mut s = Scheduler::new(config(2, 4)).unwrap();
        let id = s.add(req(0, 3, 4)).unwrap();
        if let Some(seq) = s.seqs.get_mut(&id) {
            seq.tokens.extend([1; 10]);
        }
        let b = s.schedule().unwrap();
        assert!(b.is_empty());
        assert!(s.is_finished());
        let done = s.take_finished();
        assert_eq!(done[0].finish_reason(), Some(FinishReason::KvPoolExhausted));

        // With blocks held by nobody the scheduler knows, it reports the
        // leak instead of failing requests one by one.
        let mut s = Scheduler::new(config(2, 4)).unwrap();
        s.blocks.allocate(SeqId(999), 5).unwrap();
        s.add(req(1, 3, 4)).unwrap();
        assert_eq!(
            s.schedule().unwrap_err(),
            ScheduleError::LeakedBlocks { free: 0, total: 2 }
        );
        assert!(s.check_invariants().is_err());
    }

    #[test]
    fn token_budget_and_max_num_seqs_hold_in_every_batch() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 3,
            max_batched_tokens: 20,
            max_model_len: 20,
            ..config(64, 4)
        })
        .unwrap();
        for r in 0..10 {
            s.add(req(r, 7, 5)).unwrap();
        }
        // Two 7-token prompts fit 20 tokens; a third would make 21.
        let p = s.schedule().unwrap();
        assert_eq!(
            (p.kind, p.len(), p.num_tokens()),
            (BatchKind::Prefill, 2, 14)
        );
        s.postprocess(&p, &[1, 1]).unwrap();
        // The third fits the budget now but no more: max_num_seqs is 3.
        let p = s.schedule().unwrap();
        assert_eq!((p.kind, p.len()), (BatchKind::Prefill, 1));
        s.postprocess(&p, &[1]).unwrap();
        let d = s.schedule().unwrap();
        assert_eq!((d.kind, d.len()), (BatchKind::Decode, 3));
        s.postprocess(&d, &[1, 1, 1]).unwrap();
        // drive checks both limits on every remaining batch.
        let done = drive(&mut s, |_| 2, 1_000);
        assert_eq!(done.len(), 10);
    }

    #[test]
    fn decode_batches_of_many_short_sequences_fit_the_budget() {
        // A decode step runs one token per running sequence, so a config
        // allowing more sequences than budget tokens is refused...
        let small_budget = SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 4,
            max_model_len: 4,
            ..config(64, 4)
        };
        let e = Scheduler::new(small_budget).unwrap_err();
        assert_eq!(
            e,
            ConfigError::BudgetBelowMaxNumSeqs {
                max_batched_tokens: 4,
                max_num_seqs: 8
            }
        );
        assert!(e.to_string().contains("max_num_seqs (8)"), "{e}");
        // ...and at the limit, full decode batches exactly fill the budget.
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            ..small_budget
        })
        .unwrap();
        for r in 0..12 {
            s.add(req(r, 1, 3)).unwrap();
        }
        let mut full_decodes = 0;
        while !s.is_finished() {
            let b = s.schedule().unwrap();
            check_batch(&s, &b);
            if b.kind == BatchKind::Decode && b.num_tokens() == 4 {
                full_decodes += 1;
            }
            s.postprocess(&b, &vec![1; b.len()]).unwrap();
            assert!(s.next_step < 1_000, "no progress");
        }
        assert!(full_decodes > 0);
        assert_eq!(s.take_finished().len(), 12);
    }

    #[test]
    fn thousand_random_aborts_leave_the_pool_as_it_started() {
        let c = SchedulerConfig {
            max_num_seqs: 4,
            max_batched_tokens: 48,
            max_model_len: 48,
            vocab_size: VOCAB,
            num_blocks: 12,
            block_size: 4,
        };
        let mut s = Scheduler::new(c).unwrap();
        let start_free = s.block_manager().num_free();
        let mut rng = SmallRng::seed_from_u64(99);
        let mut pending: Option<Batch> = None;
        let (mut aborts, mut aborts_in_flight, mut finished) = (0, 0, 0);
        let mut next_req = 0u64;
        for _ in 0..200_000 {
            if aborts >= 1000 {
                break;
            }
            match rng.random_range(0..10) {
                0..=2 => {
                    let mut r = req(next_req, rng.random_range(1..20), rng.random_range(1..25));
                    r.params.ignore_eos = rng.random_bool(0.5);
                    next_req += 1;
                    // Some are too long for max_model_len; those are rejected.
                    let _ = s.add(r);
                }
                3..=4 => {
                    let live: Vec<SeqId> = s.waiting().chain(s.running().iter().copied()).collect();
                    if !live.is_empty() {
                        let id = live[rng.random_range(0..live.len())];
                        let seq = s.abort(id).unwrap();
                        assert_eq!(seq.finish_reason(), Some(FinishReason::Aborted));
                        assert!(!s.block_manager().contains(id));
                        assert_eq!(
                            s.abort(id).unwrap_err(),
                            ScheduleError::UnknownSeq { seq: id }
                        );
                        aborts += 1;
                        if pending.is_some() {
                            aborts_in_flight += 1;
                        }
                    }
                }
                _ => match pending.take() {
                    Some(b) => {
                        let sampled: Vec<u32> = b
                            .items
                            .iter()
                            .map(|_| if rng.random_bool(0.05) { EOS } else { 1 })
                            .collect();
                        s.postprocess(&b, &sampled).unwrap();
                        finished += s.take_finished().len();
                    }
                    None => {
                        let b = s.schedule().unwrap();
                        check_batch(&s, &b);
                        if !b.is_empty() {
                            pending = Some(b);
                        }
                    }
                },
            }
            s.check_invariants().unwrap();
        }
        assert!(aborts >= 1000, "only {aborts} aborts");
        assert!(aborts_in_flight > 0);
        assert!(finished > 0);
        if let Some(b) = pending.take() {
            let sampled = vec![1; b.len()];
            s.postprocess(&b, &sampled).unwrap();
        }
        drive(&mut s, |_| 1, 10_000);
        assert_eq!(s.block_manager().num_free(), start_free);
        assert_eq!(start_free, 12);
        s.check_invariants().unwrap();
    }

    #[test]
    fn abort_waiting_running_and_in_flight() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 2,
            ..config(8, 4)
        })
        .unwrap();
        let a = s.add(req(0, 5, 5)).unwrap();
        let b = s.add(req(1, 5, 5)).unwrap();
        let c = s.add(req(2, 5, 5)).unwrap();
        let p = s.schedule().unwrap(); // a and b run; c waits (max_num_seqs)
        assert_eq!(p.len(), 2);
        assert_eq!(
            s.abort(c).unwrap().status,
            SeqStatus::Finished(FinishReason::Aborted)
        );
        // Abort b while its prefill is in flight: postprocess skips it.
        s.abort(b).unwrap();
        assert_eq!(s.block_manager().num_free(), 6);
        s.postprocess(&p, &[1, 1]).unwrap();
        assert_eq!(s.sequence(a).unwrap().completion(), &[1]);
        assert!(s.sequence(b).is_none());
        s.check_invariants().unwrap();
        s.abort(a).unwrap();
        assert!(s.is_finished());
        assert_eq!(s.block_manager().num_free(), 8);
        assert!(s.take_finished().is_empty());
        for id in [a, b, c, SeqId(77)] {
            assert_eq!(
                s.abort(id).unwrap_err(),
                ScheduleError::UnknownSeq { seq: id }
            );
        }
    }

    #[test]
    fn protocol_misuse_is_an_error_and_changes_nothing() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        s.add(req(0, 3, 4)).unwrap();
        s.add(req(1, 3, 4)).unwrap();
        let p = s.schedule().unwrap();
        assert_eq!(
            s.schedule().unwrap_err(),
            ScheduleError::BatchInFlight { step: p.step }
        );
        assert_eq!(
            s.postprocess(&p, &[1]).unwrap_err(),
            ScheduleError::SampledCountMismatch {
                step: p.step,
                items: 2,
                sampled: 1
            }
        );
        let e = s.postprocess(&p, &[1, VOCAB as u32]).unwrap_err();
        assert_eq!(
            e,
            ScheduleError::SampledTokenOutOfVocab {
                seq: SeqId(1),
                token: VOCAB as u32,
                vocab_size: VOCAB
            }
        );
        assert_eq!(s.sequence(SeqId(0)).unwrap().len(), 3, "no partial append");
        let mut forged = p.clone();
        forged.step += 5;
        assert!(matches!(
            s.postprocess(&forged, &[1, 1]).unwrap_err(),
            ScheduleError::StaleBatch { .. }
        ));
        s.postprocess(&p, &[1, 1]).unwrap();
        // The same batch twice is stale.
        assert_eq!(
            s.postprocess(&p, &[1, 1]).unwrap_err(),
            ScheduleError::StaleBatch {
                step: p.step,
                in_flight: None
            }
        );
        s.check_invariants().unwrap();
        drive(&mut s, |_| 1, 100);
    }

    fn reject(s: &mut Scheduler, r: Request) -> RequestError {
        let before = (s.num_waiting(), s.block_manager().num_free());
        let e = s.add(r).unwrap_err();
        assert_eq!((s.num_waiting(), s.block_manager().num_free()), before);
        e
    }

    #[test]
    fn validation_empty_prompt() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let e = reject(&mut s, req(3, 0, 4));
        assert_eq!(e, RequestError::EmptyPrompt { request: 3 });
        assert_eq!((e.field(), e.request()), ("prompt", 3));
        assert!(e.to_string().contains("prompt is empty"));
    }

    #[test]
    fn validation_prompt_token_out_of_vocab() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let mut r = req(3, 4, 4);
        r.prompt[2] = VOCAB as u32;
        let e = reject(&mut s, r);
        assert_eq!(
            e,
            RequestError::PromptTokenOutOfVocab {
                request: 3,
                index: 2,
                token: VOCAB as u32,
                vocab_size: VOCAB
            }
        );
        assert_eq!(e.field(), "prompt");
        assert!(e.to_string().contains("prompt token 2 is 100"), "{e}");
    }

    #[test]
    fn validation_eos_out_of_vocab() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let mut r = req(3, 4, 4);
        r.eos = vec![1, 1000];
        let e = reject(&mut s, r);
        assert!(matches!(e, RequestError::EosOutOfVocab { token: 1000, .. }));
        assert_eq!(e.field(), "eos");
    }

    #[test]
    fn validation_max_tokens_zero() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let e = reject(&mut s, req(3, 4, 0));
        assert_eq!(
            e,
            RequestError::Sampling {
                request: 3,
                source: SamplingParamsError::MaxTokens
            }
        );
        assert_eq!(e.field(), "max_tokens");
        assert!(e.to_string().contains("max_tokens"));
    }

    #[test]
    fn validation_longer_than_max_model_len() {
        let mut s = Scheduler::new(config(64, 4)).unwrap(); // max_model_len 64
        let e = reject(&mut s, req(3, 60, 5));
        assert_eq!(
            e,
            RequestError::TooLong {
                request: 3,
                prompt_len: 60,
                max_tokens: 5,
                max_model_len: 64
            }
        );
        assert_eq!(e.field(), "max_tokens");
        assert!(e.to_string().contains("max_model_len 64"));
        // No overflow on a huge max_tokens.
        let e = reject(&mut s, req(4, 1, usize::MAX));
        assert!(matches!(e, RequestError::TooLong { .. }));
        s.add(req(5, 60, 4)).unwrap(); // exactly 64
    }

    #[test]
    fn validation_temperature() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        for t in [f32::NAN, -0.5] {
            let mut r = req(3, 4, 4);
            r.params.temperature = t;
            let e = reject(&mut s, r);
            assert!(matches!(
                e,
                RequestError::Sampling {
                    source: SamplingParamsError::Temperature(_),
                    ..
                }
            ));
            assert_eq!(e.field(), "temperature");
            assert!(e.to_string().contains("temperature"), "{e}");
        }
    }

    #[test]
    fn validation_top_p() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        for p in [0.0, 1.5, f32::NAN] {
            let mut r = req(3, 4, 4);
            r.params.temperature = 1.0;
            r.params.top_p = p;
            let e = reject(&mut s, r);
            assert!(matches!(
                e,
                RequestError::Sampling {
                    source: SamplingParamsError::TopP(_),
                    ..
                }
            ));
            assert_eq!(e.field(), "top_p");
        }
    }

    #[test]
    fn validation_top_k_zero_means_off() {
        let mut s = Scheduler::new(config(8, 4)).unwrap();
        let mut r = req(3, 4, 4);
        r.params.top_k = 0;
        s.add(r).unwrap();
    }

    #[test]
    fn bad_requests_do_not_affect_good_ones() {
        let mut s = Scheduler::new(config(16, 4)).unwrap();
        let good1 = s.add(req(1, 4, 3)).unwrap();
        assert!(s.add(req(2, 0, 3)).is_err());
        let mut bad = req(3, 4, 3);
        bad.params.temperature = f32::NAN;
        assert!(s.add(bad).is_err());
        let good2 = s.add(req(4, 4, 3)).unwrap();
        assert_eq!((good1, good2), (SeqId(0), SeqId(1)), "rejects use no id");
        let done = drive(&mut s, |_| 5, 100);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| d.completion() == [5, 5, 5]));
    }

    #[test]
    fn config_validation_names_the_field() {
        let good = config(8, 4);
        Scheduler::new(good).unwrap();
        type Mutate = fn(&mut SchedulerConfig);
        let zero = |f: Mutate| {
            let mut c = good;
            f(&mut c);
            Scheduler::new(c).unwrap_err()
        };
        let cases: [(Mutate, &str); 6] = [
            (|c| c.max_num_seqs = 0, "max_num_seqs"),
            (|c| c.max_batched_tokens = 0, "max_batched_tokens"),
            (|c| c.max_model_len = 0, "max_model_len"),
            (|c| c.vocab_size = 0, "vocab_size"),
            (|c| c.num_blocks = 0, "num_blocks"),
            (|c| c.block_size = 0, "block_size"),
        ];
        for (f, field) in cases {
            let e = zero(f);
            assert_eq!(e, ConfigError::Zero { field });
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = zero(|c| c.max_batched_tokens = 63);
        assert_eq!(
            e,
            ConfigError::BudgetBelowModelLen {
                max_batched_tokens: 63,
                max_model_len: 64
            }
        );
        let e = zero(|c| c.num_blocks = u32::MAX as usize + 1);
        assert!(matches!(
            e,
            ConfigError::Pool(BlockError::PoolTooLarge { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random configs and workloads with random EOS: every admitted
        /// request finishes exactly once for a valid reason, every batch
        /// respects the limits, and no block leaks.
        #[test]
        fn random_workloads_complete_without_leaks(
            max_num_seqs in 1usize..6,
            block_size in 1usize..6,
            num_blocks in 1usize..16,
            max_model_len in 1usize..40,
            extra_budget in 0usize..8,
            reqs in proptest::collection::vec((1usize..40, 1usize..20, any::<bool>()), 1..12),
            seed in any::<u64>(),
        ) {
            let c = SchedulerConfig {
                max_num_seqs,
                max_batched_tokens: max_model_len.max(max_num_seqs) + extra_budget,
                max_model_len,
                vocab_size: 20,
                num_blocks,
                block_size,
            };
            let mut s = Scheduler::new(c).unwrap();
            let mut admitted = Vec::new();
            for (i, &(len, max_tokens, ignore_eos)) in reqs.iter().enumerate() {
                // Mostly within max_model_len, so most requests are admitted.
                let len = 1 + len % max_model_len;
                let max_tokens = 1 + max_tokens % max_model_len;
                let mut r = req(i as u64, len, max_tokens);
                for t in &mut r.prompt {
                    *t = 1 + *t % 19;
                }
                r.params.ignore_eos = ignore_eos;
                match s.add(r) {
                    Ok(id) => admitted.push(id),
                    Err(e) => {
                        let expected = matches!(
                            e,
                            RequestError::TooLong { .. } | RequestError::ExceedsKvPool { .. }
                        );
                        prop_assert!(expected, "{}", e);
                    }
                }
            }
            let mut rng = SmallRng::seed_from_u64(seed);
            let done = drive(&mut s, |_| if rng.random_bool(0.1) { EOS } else { 3 }, 20_000);
            prop_assert_eq!(done.len(), admitted.len());
            let mut ids: Vec<SeqId> = done.iter().map(|d| d.id).collect();
            ids.sort();
            prop_assert_eq!(ids, admitted);
            for d in &done {
                prop_assert!(d.len() <= max_model_len);
                prop_assert!(d.num_completion_tokens() <= d.params.max_tokens);
                match d.finish_reason() {
                    Some(FinishReason::MaxTokens) => {
                        prop_assert_eq!(d.num_completion_tokens(), d.params.max_tokens)
                    }
                    Some(FinishReason::Eos) => {
                        prop_assert!(!d.params.ignore_eos);
                        prop_assert_eq!(d.tokens.last(), Some(&EOS));
                    }
                    Some(FinishReason::KvPoolExhausted) => {
                        prop_assert!(d.len().div_ceil(block_size) > num_blocks)
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(s.block_manager().num_free(), num_blocks);
        }
    }
}
