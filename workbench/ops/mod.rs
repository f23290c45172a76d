//! One file per kernel, each implementing [`crate::op::Op`].

pub mod kv_store;
pub mod paged_attention;
pub mod prefill_attention;
pub mod rmsnorm;
pub mod rope;
pub mod rope_kv_store;
pub mod silu_mul;
