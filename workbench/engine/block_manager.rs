//! Paged KV-cache block accounting (vLLM's PagedAttention, as nano-vllm's
//! `block_manager.py` lays it out, without prefix caching yet).
//!
//! The KV cache is a pool of `num_blocks` fixed-size blocks
//! (`// [num_blocks, block_size, kv_heads, head_dim]` per layer for K and V).
//! A sequence owns a *block table*: the ordered list of block ids holding its
//! tokens, so token position `p` lives in block `table[p / block_size]` at
//! offset `p % block_size`, i.e. at flat *slot*
//! `table[p / block_size] * block_size + p % block_size`. The attention
//! kernels read K/V through the table; the cache-write kernel takes one slot
//! per new token (`slot_mapping`).
//!
//! This module only does the bookkeeping: a free list, a reference count per
//! block, and the tables. Blocks carry reference counts although nothing
//! shares them yet, so that prefix caching (several sequences pointing at the
//! same prompt blocks, as nano-vllm does with its hash table) can be added
//! without changing how blocks are released. Every operation either succeeds
//! or fails with a [`BlockError`] and changes nothing.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use thiserror::Error;

/// Tokens per KV-cache block unless configured otherwise (vLLM and nano-vllm
/// default to 16 for CUDA; nano-vllm uses 256 for its flash-attn kernels).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A sequence's id, handed out by the scheduler; the block manager only uses
/// it as the key of a block table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// What went wrong in a block-manager call. Each names the sequence and the
/// numbers that did not add up; a failed call leaves the manager unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BlockError {
    #[error("block manager: block_size must be at least 1, got 0")]
    ZeroBlockSize,
    #[error(
        "block manager: a pool of {num_blocks} blocks of {block_size} tokens does not fit \
         u32 block ids and i64 slots"
    )]
    PoolTooLarge {
        num_blocks: usize,
        block_size: usize,
    },
    #[error(
        "block manager: {seq} already holds {blocks} block(s) for {tokens} token(s); \
         free it before allocating again"
    )]
    AlreadyAllocated {
        seq: SeqId,
        blocks: usize,
        tokens: usize,
    },
    #[error("block manager: {seq} holds no blocks (never allocated, or already freed)")]
    UnknownSeq { seq: SeqId },
    #[error(
        "block manager: {seq} needs {needed} free block(s), but only {free} of {total} are free"
    )]
    OutOfBlocks {
        seq: SeqId,
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error(
        "block manager: token range {start}..{end} of {seq} is not within its {num_tokens} \
         allocated token(s)"
    )]
    BadRange {
        seq: SeqId,
        start: usize,
        end: usize,
        num_tokens: usize,
    },
    #[error("block manager: invariant broken: {0}")]
    Corrupt(String),
}

/// One sequence's share of the pool.
#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    /// Block ids in token order; `blocks.len() == ceil(num_tokens / block_size)`.
    blocks: Vec<u32>,
    /// Tokens that have a slot (written or about to be written to the cache).
    num_tokens: usize,
}

/// Free list, reference counts and block tables for one KV-cache pool.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    /// `[num_blocks]`: how many tables hold each block; 0 means free.
    ref_counts: Vec<u32>,
    /// Free blocks, taken from the front and returned to the back (FIFO, as
    /// nano-vllm's deque), so recently freed blocks are reused last; with
    /// prefix caching that keeps freed-but-cached blocks alive longest.
    free: VecDeque<u32>,
    tables: HashMap<SeqId, SeqBlocks>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, BlockError> {
        if block_size == 0 {
            return Err(BlockError::ZeroBlockSize);
        }
        // Block ids are u32 (what the kernels' block tables hold) and slots
        // are i64 (vLLM's slot_mapping dtype, -1 meaning padding), so the
        // whole pool must be addressable in both.
        let too_large = || BlockError::PoolTooLarge {
            num_blocks,
            block_size,
        };
        let num_blocks_u32 = u32::try_from(num_blocks).map_err(|_| too_large())?;
        let total_slots = num_blocks.checked_mul(block_size).ok_or_else(too_large)?;
        i64::try_from(total_slots).map_err(|_| too_large())?;
        Ok(Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks_u32).collect(),
            tables: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool, free or not.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks referenced by at least one table.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Sequences that currently hold a table (possibly empty).
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// How many tables hold `block`, or `None` for an id outside the pool.
    pub fn ref_count(&self, block: u32) -> Option<u32> {
        self.ref_counts.get(block as usize).copied()
    }

    /// Whether a new sequence of `num_tokens` tokens would fit right now.
    pub fn can_allocate(&self, num_tokens: usize) -> bool {
        self.blocks_for(num_tokens) <= self.num_free()
    }

    /// Gives `seq` the blocks for its first `num_tokens` tokens (a prefill).
    /// Fails, changing nothing, if `seq` already has a table or the pool is
    /// short of blocks.
    pub fn allocate(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), BlockError> {
        if let Some(t) = self.tables.get(&seq) {
            return Err(BlockError::AlreadyAllocated {
                seq,
                blocks: t.blocks.len(),
                tokens: t.num_tokens,
            });
        }
        let needed = self.blocks_for(num_tokens);
        if needed > self.num_free() {
            return Err(self.out_of_blocks(seq, needed));
        }
        let mut blocks = Vec::with_capacity(needed);
        for _ in 0..needed {
            blocks.push(self.take_free_block()?);
        }
        self.tables.insert(seq, SeqBlocks { blocks, num_tokens });
        Ok(())
    }

    /// Whether `seq` can get a slot for one more token: either its last
    /// block has room or a free block exists. False for an unknown `seq`.
    pub fn can_append(&self, seq: SeqId) -> bool {
        match self.tables.get(&seq) {
            Some(t) => !self.needs_new_block(t) || self.num_free() > 0,
            None => false,
        }
    }

    /// Reserves the slot for `seq`'s next token (a decode step) and returns
    /// it, taking a new block when the last one is full. Fails, changing
    /// nothing, for an unknown `seq` or when a block is needed and none is
    /// free.
    pub fn append_slot(&mut self, seq: SeqId) -> Result<i64, BlockError> {
        let t = self
            .tables
            .get(&seq)
            .ok_or(BlockError::UnknownSeq { seq })?;
        let new_block = if self.needs_new_block(t) {
            if self.free.is_empty() {
                return Err(self.out_of_blocks(seq, 1));
            }
            Some(self.take_free_block()?)
        } else {
            None
        };
        let block_size = self.block_size;
        let t = self
            .tables
            .get_mut(&seq)
            .ok_or(BlockError::UnknownSeq { seq })?;
        t.blocks.extend(new_block);
        let pos = t.num_tokens;
        t.num_tokens += 1;
        Self::slot_of(&t.blocks, block_size, pos).ok_or_else(|| {
            BlockError::Corrupt(format!("{seq}: no block for its token {pos} after append"))
        })
    }

    /// Slots of `seq`'s token positions `start..end` (the prefill
    /// slot_mapping); the range must lie within its allocated tokens.
    pub fn slots(&self, seq: SeqId, start: usize, end: usize) -> Result<Vec<i64>, BlockError> {
        let t = self
            .tables
            .get(&seq)
            .ok_or(BlockError::UnknownSeq { seq })?;
        if start > end || end > t.num_tokens {
            return Err(BlockError::BadRange {
                seq,
                start,
                end,
                num_tokens: t.num_tokens,
            });
        }
        (start..end)
            .map(|pos| {
                Self::slot_of(&t.blocks, self.block_size, pos).ok_or_else(|| {
                    BlockError::Corrupt(format!(
                        "{seq}: {} block(s) cannot hold its token {pos}",
                        t.blocks.len()
                    ))
                })
            })
            .collect()
    }

    /// `seq`'s block ids in token order.
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32], BlockError> {
        self.tables
            .get(&seq)
            .map(|t| t.blocks.as_slice())
            .ok_or(BlockError::UnknownSeq { seq })
    }

    /// Tokens of `seq` that have a slot.
    pub fn num_tokens(&self, seq: SeqId) -> Result<usize, BlockError> {
        self.tables
            .get(&seq)
            .map(|t| t.num_tokens)
            .ok_or(BlockError::UnknownSeq { seq })
    }

    /// Drops `seq`'s table; blocks no other table holds go back to the free
    /// list. Freeing a sequence twice (or one never allocated) is an error,
    /// not a panic, and changes nothing.
    pub fn free(&mut self, seq: SeqId) -> Result<(), BlockError> {
        let t = self
            .tables
            .remove(&seq)
            .ok_or(BlockError::UnknownSeq { seq })?;
        // Check every count first so a corrupt table cannot leave the pool
        // half released.
        for &b in &t.blocks {
            if self.ref_counts.get(b as usize).copied().unwrap_or(0) == 0 {
                let msg = format!("{seq} holds block {b}, whose reference count is already 0");
                self.tables.insert(seq, t);
                return Err(BlockError::Corrupt(msg));
            }
        }
        for &b in &t.blocks {
            let rc = &mut self.ref_counts[b as usize];
            *rc -= 1;
            if *rc == 0 {
                self.free.push_back(b);
            }
        }
        Ok(())
    }

    /// Checks the accounting from scratch: free + used == total, free blocks
    /// have count 0 and appear once, each block's count equals the number of
    /// tables holding it, and each table has exactly the blocks its tokens
    /// need. Tests call it after every step; it costs O(pool + tables).
    pub fn check_invariants(&self) -> Result<(), BlockError> {
        let total = self.num_blocks();
        let mut in_free = vec![false; total];
        for &b in &self.free {
            let i = b as usize;
            if i >= total {
                return Err(BlockError::Corrupt(format!(
                    "free list holds block {b}, outside the pool of {total}"
                )));
            }
            if in_free[i] {
                return Err(BlockError::Corrupt(format!(
                    "block {b} is in the free list twice"
                )));
            }
            in_free[i] = true;
        }
        let mut holders = vec![0u32; total];
        for (seq, t) in &self.tables {
            let need = self.blocks_for(t.num_tokens);
            if t.blocks.len() != need {
                return Err(BlockError::Corrupt(format!(
                    "{seq} has {} block(s) for {} token(s), needs {need}",
                    t.blocks.len(),
                    t.num_tokens
                )));
            }
            for &b in &t.blocks {
                let i = b as usize;
                if i >= total {
                    return Err(BlockError::Corrupt(format!(
                        "{seq} holds block {b}, outside the pool of {total}"
                    )));
                }
                holders[i] += 1;
            }
        }
        let mut used = 0;
        for (b, (&rc, &held)) in self.ref_counts.iter().zip(&holders).enumerate() {
            if rc != held {
                return Err(BlockError::Corrupt(format!(
                    "block {b} has reference count {rc} but {held} table(s) hold it"
                )));
            }
            if (rc == 0) != in_free[b] {
                return Err(BlockError::Corrupt(format!(
                    "block {b} has reference count {rc} but is{} in the free list",
                    if in_free[b] { "" } else { " not" }
                )));
            }
            if rc > 0 {
                used += 1;
            }
        }
        if used + self.num_free() != total {
            return Err(BlockError::Corrupt(format!(
                "{used} used + {} free != {total} blocks",
                self.num_free()
            )));
        }
        Ok(())
    }

    fn needs_new_block(&self, t: &SeqBlocks) -> bool {
        t.num_tokens == t.blocks.len() * self.block_size
    }

    fn take_free_block(&mut self) -> Result<u32, BlockError> {
        let b = self
            .free
            .pop_front()
            .ok_or_else(|| BlockError::Corrupt("free list ran dry after a check".into()))?;
        self.ref_counts[b as usize] += 1;
        Ok(b)
    }

    fn out_of_blocks(&self, seq: SeqId, needed: usize) -> BlockError {
        BlockError::OutOfBlocks {
            seq,
            needed,
            free: self.num_free(),
            total: self.num_blocks(),
        }
    }

    /// Flat slot of token `pos`; `None` if the table is too short. Fits i64
    /// because `new` checked num_blocks * block_size does.
    fn slot_of(blocks: &[u32], block_size: usize, pos: usize) -> Option<i64> {
        let block = *blocks.get(pos / block_size)? as usize;
        i64::try_from(block * block_size + pos % block_size).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const S: SeqId = SeqId(7);

    fn bm(num_blocks: usize) -> BlockManager {
        let bm = BlockManager::new(num_blocks, DEFAULT_BLOCK_SIZE);
        bm.expect("valid pool")
    }

    #[test]
    fn new_pool_is_all_free() {
        let m = bm(10);
        assert_eq!(m.num_blocks(), 10);
        assert_eq!(m.num_free(), 10);
        assert_eq!(m.num_used(), 0);
        assert_eq!(m.block_size(), 16);
        m.check_invariants().unwrap();
    }

    #[test]
    fn zero_block_size_is_an_error() {
        assert_eq!(
            BlockManager::new(4, 0).unwrap_err(),
            BlockError::ZeroBlockSize
        );
    }

    #[test]
    fn pool_too_large_is_an_error() {
        let e = BlockManager::new(u32::MAX as usize + 1, 1).unwrap_err();
        assert!(matches!(e, BlockError::PoolTooLarge { .. }), "{e}");
        let e = BlockManager::new(4, usize::MAX / 2).unwrap_err();
        assert!(matches!(e, BlockError::PoolTooLarge { .. }), "{e}");
    }

    #[test]
    fn sixteen_tokens_take_one_block_seventeen_take_two() {
        let mut m = bm(4);
        m.allocate(SeqId(1), 16).unwrap();
        assert_eq!(m.block_table(SeqId(1)).unwrap().len(), 1);
        m.allocate(SeqId(2), 17).unwrap();
        assert_eq!(m.block_table(SeqId(2)).unwrap().len(), 2);
        assert_eq!(m.num_free(), 1);
        m.allocate(SeqId(3), 1).unwrap();
        assert_eq!(m.block_table(SeqId(3)).unwrap().len(), 1);
        assert_eq!(m.num_free(), 0);
        m.check_invariants().unwrap();
    }

    #[test]
    fn zero_tokens_take_no_block_and_first_append_takes_one() {
        let mut m = bm(2);
        m.allocate(S, 0).unwrap();
        assert_eq!(m.block_table(S).unwrap(), &[] as &[u32]);
        assert!(m.can_append(S));
        let slot = m.append_slot(S).unwrap();
        let b = m.block_table(S).unwrap()[0];
        assert_eq!(slot, b as i64 * 16);
        m.check_invariants().unwrap();
    }

    #[test]
    fn prefill_slots_follow_the_block_table() {
        let mut m = bm(8);
        // Take and return some blocks so the table is not just 0, 1, 2.
        m.allocate(SeqId(1), 40).unwrap();
        m.allocate(S, 33).unwrap();
        m.free(SeqId(1)).unwrap();
        let table = m.block_table(S).unwrap().to_vec();
        assert_eq!(table.len(), 3);
        let slots = m.slots(S, 0, 33).unwrap();
        for (pos, &slot) in slots.iter().enumerate() {
            assert_eq!(slot, table[pos / 16] as i64 * 16 + (pos % 16) as i64);
        }
        assert_eq!(m.slots(S, 15, 17).unwrap(), &slots[15..17]);
        assert!(m.slots(S, 5, 5).unwrap().is_empty());
    }

    #[test]
    fn append_across_a_block_boundary_takes_a_new_block() {
        let mut m = bm(3);
        m.allocate(S, 15).unwrap();
        assert_eq!(m.num_free(), 2);
        let b0 = m.block_table(S).unwrap()[0] as i64;
        // Position 15 is the last offset of block 0: no new block.
        assert_eq!(m.append_slot(S).unwrap(), b0 * 16 + 15);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.num_tokens(S).unwrap(), 16);
        // Position 16 needs block 1.
        let slot = m.append_slot(S).unwrap();
        let table = m.block_table(S).unwrap().to_vec();
        assert_eq!(table.len(), 2);
        assert_eq!(slot, table[1] as i64 * 16);
        assert_eq!(m.num_free(), 1);
        assert_eq!(m.num_tokens(S).unwrap(), 17);
        // Positions 17..32 stay in block 1.
        for pos in 17..32 {
            assert_eq!(m.append_slot(S).unwrap(), table[1] as i64 * 16 + (pos % 16));
        }
        assert_eq!(m.num_free(), 1);
        m.check_invariants().unwrap();
    }

    #[test]
    fn append_without_a_free_block_fails_and_changes_nothing() {
        let mut m = bm(1);
        m.allocate(S, 16).unwrap();
        assert!(!m.can_append(S));
        let e = m.append_slot(S).unwrap_err();
        assert_eq!(
            e,
            BlockError::OutOfBlocks {
                seq: S,
                needed: 1,
                free: 0,
                total: 1
            }
        );
        assert_eq!(m.num_tokens(S).unwrap(), 16);
        assert_eq!(m.block_table(S).unwrap().len(), 1);
        m.check_invariants().unwrap();
    }

    #[test]
    fn allocate_without_enough_blocks_fails_and_changes_nothing() {
        let mut m = bm(2);
        m.allocate(SeqId(1), 1).unwrap();
        assert!(!m.can_allocate(17));
        let e = m.allocate(S, 17).unwrap_err();
        assert_eq!(
            e,
            BlockError::OutOfBlocks {
                seq: S,
                needed: 2,
                free: 1,
                total: 2
            }
        );
        assert!(!m.contains(S));
        assert_eq!(m.num_free(), 1);
        m.check_invariants().unwrap();
        assert!(e.to_string().contains("needs 2 free block(s)"), "{e}");
    }

    #[test]
    fn allocating_a_seq_twice_is_an_error() {
        let mut m = bm(4);
        m.allocate(S, 20).unwrap();
        let e = m.allocate(S, 1).unwrap_err();
        assert_eq!(
            e,
            BlockError::AlreadyAllocated {
                seq: S,
                blocks: 2,
                tokens: 20
            }
        );
        assert_eq!(m.num_free(), 2);
        m.check_invariants().unwrap();
    }

    #[test]
    fn unknown_seq_is_an_error_everywhere() {
        let mut m = bm(4);
        let unknown = BlockError::UnknownSeq { seq: S };
        assert!(!m.can_append(S));
        assert_eq!(m.append_slot(S).unwrap_err(), unknown);
        assert_eq!(m.slots(S, 0, 0).unwrap_err(), unknown);
        assert_eq!(m.block_table(S).unwrap_err(), unknown);
        assert_eq!(m.num_tokens(S).unwrap_err(), unknown);
        assert_eq!(m.free(S).unwrap_err(), unknown);
        assert!(unknown.to_string().contains("seq 7"));
    }

    #[test]
    fn freeing_twice_is_an_error_not_a_panic() {
        let mut m = bm(4);
        m.allocate(S, 40).unwrap();
        m.free(S).unwrap();
        assert_eq!(m.num_free(), 4);
        assert_eq!(m.free(S).unwrap_err(), BlockError::UnknownSeq { seq: S });
        assert_eq!(m.num_free(), 4);
        m.check_invariants().unwrap();
        // And the seq can be allocated again afterwards.
        m.allocate(S, 1).unwrap();
    }

    #[test]
    fn slot_range_outside_the_allocation_is_an_error() {
        let mut m = bm(4);
        m.allocate(S, 20).unwrap();
        let bad = |start, end| BlockError::BadRange {
            seq: S,
            start,
            end,
            num_tokens: 20,
        };
        assert_eq!(m.slots(S, 0, 21).unwrap_err(), bad(0, 21));
        assert_eq!(m.slots(S, 10, 9).unwrap_err(), bad(10, 9));
        assert_eq!(m.slots(S, 0, 20).unwrap().len(), 20);
    }

    #[test]
    fn ref_counts_are_one_without_sharing() {
        let mut m = bm(6);
        m.allocate(SeqId(1), 33).unwrap();
        m.allocate(SeqId(2), 30).unwrap();
        for b in 0..5u32 {
            assert_eq!(m.ref_count(b), Some(1));
        }
        assert_eq!(m.ref_count(5), Some(0));
        assert_eq!(m.ref_count(6), None);
        let t1 = m.block_table(SeqId(1)).unwrap();
        let t2 = m.block_table(SeqId(2)).unwrap();
        assert!(t1.iter().all(|b| !t2.contains(b)));
    }

    #[test]
    fn freed_blocks_are_reused_last() {
        let mut m = bm(4);
        m.allocate(SeqId(1), 16).unwrap(); // block 0
        m.free(SeqId(1)).unwrap(); // free list 1 2 3 0
        m.allocate(SeqId(2), 64).unwrap();
        assert_eq!(m.block_table(SeqId(2)).unwrap(), &[1, 2, 3, 0]);
    }

    #[test]
    fn invariant_checker_catches_a_double_booked_block() {
        let mut m = bm(4);
        m.allocate(SeqId(1), 16).unwrap();
        m.allocate(SeqId(2), 16).unwrap();
        // Sabotage: make seq 2 point at seq 1's block.
        let b1 = m.tables[&SeqId(1)].blocks[0];
        if let Some(t) = m.tables.get_mut(&SeqId(2)) {
            t.blocks[0] = b1;
        }
        let e = m.check_invariants().unwrap_err();
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
    }

    #[test]
    fn invariant_checker_catches_a_leaked_block() {
        let mut m = bm(4);
        m.allocate(S, 16).unwrap();
        m.tables.clear(); // the block is neither free nor held
        assert!(matches!(
            m.check_invariants().unwrap_err(),
            BlockError::Corrupt(_)
        ));
    }

    /// Random allocations, appends and aborts (frees of live sequences) on a
    /// small pool, checking the invariants after each step and that the
    /// pool drains back to all-free. Stops after 1000 aborts.
    #[test]
    fn thousand_random_aborts_leave_the_pool_as_it_started() {
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        let mut m = BlockManager::new(24, 4).unwrap();
        let start_free = m.num_free();
        let mut live: Vec<(SeqId, usize)> = Vec::new();
        let mut next = 0u64;
        let mut aborts = 0;
        while aborts < 1000 {
            match rng.random_range(0..10) {
                0..=3 => {
                    let n = rng.random_range(0..30);
                    let id = SeqId(next);
                    next += 1;
                    match m.allocate(id, n) {
                        Ok(()) => live.push((id, n)),
                        Err(e) => {
                            assert!(!m.can_allocate(n));
                            assert!(matches!(e, BlockError::OutOfBlocks { .. }));
                            assert!(!m.contains(id));
                        }
                    }
                }
                4..=6 if !live.is_empty() => {
                    let i = rng.random_range(0..live.len());
                    let (id, n) = live[i];
                    let free_before = m.num_free();
                    match m.append_slot(id) {
                        Ok(slot) => {
                            let table = m.block_table(id).unwrap();
                            assert_eq!(slot, table[n / 4] as i64 * 4 + (n % 4) as i64);
                            live[i].1 += 1;
                        }
                        Err(e) => {
                            assert!(matches!(e, BlockError::OutOfBlocks { .. }));
                            assert_eq!(m.num_free(), free_before);
                            assert_eq!(m.num_tokens(id).unwrap(), n);
                        }
                    }
                }
                _ if !live.is_empty() => {
                    let i = rng.random_range(0..live.len());
                    let (id, _) = live.swap_remove(i);
                    m.free(id).unwrap();
                    aborts += 1;
                }
                _ => {}
            }
            m.check_invariants().unwrap();
            assert_eq!(m.num_seqs(), live.len());
        }
        for (id, _) in live.drain(..) {
            m.free(id).unwrap();
        }
        m.check_invariants().unwrap();
        assert_eq!(m.num_free(), start_free);
        assert_eq!(m.num_free(), m.num_blocks());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate { seq: u64, tokens: usize },
        Append { seq: u64 },
        Free { seq: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..6u64, 0..50usize).prop_map(|(seq, tokens)| Op::Allocate { seq, tokens }),
            3 => (0..6u64).prop_map(|seq| Op::Append { seq }),
            1 => (0..6u64).prop_map(|seq| Op::Free { seq }),
        ]
    }

    proptest! {
        /// Model-based check: a shadow map of token counts predicts every
        /// outcome; failures change nothing; invariants hold after each op;
        /// freeing everything returns the pool to all-free.
        #[test]
        fn random_ops_keep_the_books(
            num_blocks in 1usize..12,
            block_size in 1usize..6,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut m = BlockManager::new(num_blocks, block_size).unwrap();
            let mut model: HashMap<SeqId, usize> = HashMap::new();
            for op in ops {
                let free_before = m.num_free();
                match op {
                    Op::Allocate { seq, tokens } => {
                        let id = SeqId(seq);
                        let need = tokens.div_ceil(block_size);
                        let live = model.contains_key(&id);
                        let r = m.allocate(id, tokens);
                        if live {
                            let is_already = matches!(r, Err(BlockError::AlreadyAllocated { .. }));
                            prop_assert!(is_already);
                            prop_assert_eq!(m.num_free(), free_before);
                        } else if need > free_before {
                            let is_oob = matches!(r, Err(BlockError::OutOfBlocks { .. }));
                            prop_assert!(is_oob);
                            prop_assert_eq!(m.num_free(), free_before);
                        } else {
                            prop_assert!(r.is_ok());
                            prop_assert_eq!(m.num_free(), free_before - need);
                            model.insert(id, tokens);
                        }
                    }
                    Op::Append { seq } => {
                        let id = SeqId(seq);
                        let can = m.can_append(id);
                        let r = m.append_slot(id);
                        match model.get_mut(&id) {
                            None => {
                                prop_assert!(!can);
                                prop_assert_eq!(r, Err(BlockError::UnknownSeq { seq: id }));
                            }
                            Some(n) => {
                                let boundary = *n % block_size == 0;
                                prop_assert_eq!(can, !boundary || free_before > 0);
                                if can {
                                    let slot = r.unwrap();
                                    let table = m.block_table(id).unwrap();
                                    let want = table[*n / block_size] as i64 * block_size as i64
                                        + (*n % block_size) as i64;
                                    prop_assert_eq!(slot, want);
                                    *n += 1;
                                    prop_assert_eq!(
                                        m.num_free(),
                                        free_before - usize::from(boundary)
                                    );
                                } else {
                                    let is_oob = matches!(r, Err(BlockError::OutOfBlocks { .. }));
                                    prop_assert!(is_oob);
                                    prop_assert_eq!(m.num_free(), free_before);
                                }
                            }
                        }
                    }
                    Op::Free { seq } => {
                        let id = SeqId(seq);
                        let r = m.free(id);
                        match model.remove(&id) {
                            Some(n) => {
                                prop_assert!(r.is_ok());
                                prop_assert_eq!(m.num_free(), free_before + n.div_ceil(block_size));
                            }
                            None => prop_assert_eq!(r, Err(BlockError::UnknownSeq { seq: id })),
                        }
                    }
                }
                prop_assert!(m.check_invariants().is_ok(), "{:?}", m.check_invariants());
                prop_assert_eq!(m.num_free() + m.num_used(), num_blocks);
                for (id, n) in &model {
                    prop_assert_eq!(m.num_tokens(*id).unwrap(), *n);
                    prop_assert_eq!(m.slots(*id, 0, *n).unwrap().len(), *n);
                }
            }
            let ids: Vec<SeqId> = model.keys().copied().collect();
            for id in ids {
                m.free(id).unwrap();
            }
            prop_assert!(m.check_invariants().is_ok());
            prop_assert_eq!(m.num_free(), num_blocks);
        }
    }
}
