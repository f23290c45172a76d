//! The Qwen2 engine, split the way the model and nano-vllm read: config,
//! checkpoint location and weights, KV-cache blocks, scheduling, sampling.
//! The scheduler and block manager are pure CPU code with their own tests.

pub mod block_manager;
pub mod config;
pub mod floor;
pub mod hub;
pub mod model;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod weights;
