//! Naive CPU references for the workbench's LLM inference kernels.
//!
//! Every op here is written to be obviously correct rather than fast: plain
//! loops over `ndarray` arrays, all arithmetic in `f64`, no CUDA. The GPU
//! kernels are checked against these functions with dtype-appropriate
//! tolerances.
//!
//! Every public function validates its arguments up front and returns
//! [`ShapeError`] (naming the op and the argument) instead of panicking.
//!
//! | module | op |
//! |---|---|
//! | [`rmsnorm`] | RMSNorm and fused residual-add + RMSNorm |
//! | [`silu_mul`] | SwiGLU activation: `silu(gate) * up` |
//! | [`rope`] | NeoX-style rotary position embedding |
//! | [`kv_store`] | scatter of new K/V into a paged cache |
//! | [`rope_kv_store`] | RoPE on q and k, then k and v into the paged cache |
//! | [`paged_attention`] | decode attention over a paged KV cache |
//! | [`prefill_attention`] | causal prefill attention, packed or over a paged cache with a prefix |
//! | [`qwen2`] | a whole Qwen2 decoder forward (logits) and greedy decoding |

pub mod error;
pub mod kv_store;
pub mod paged_attention;
pub mod prefill_attention;
pub mod qwen2;
pub mod rmsnorm;
pub mod rope;
pub mod rope_kv_store;
pub mod silu_mul;

pub use error::ShapeError;

#[cfg(test)]
mod testutil;
