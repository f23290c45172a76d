//! The roofline floor of one decode step: the fewest bytes the step must
//! move and the flops it must do, over the ceilings measured on the card.
//! `workbench e2e` will report its decode step against this (target: within
//! 2x). Everything here is a lower bound: activations between kernels and
//! re-reads are not counted.

use super::config::Qwen2Config;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepFloor {
    pub weight_bytes: f64,
    pub kv_read_bytes: f64,
    pub kv_write_bytes: f64,
    pub logits_bytes: f64,
    pub bytes: f64,
    pub flops: f64,
    /// bytes / bandwidth and flops / compute, in seconds.
    pub seconds_memory: f64,
    pub seconds_compute: f64,
    /// The larger of the two.
    pub seconds: f64,
}

/// One decode step: one new token for each sequence, sequence b attending
/// over `context_lens[b]` cached tokens plus itself. `dtype_bytes` is the
/// storage size of weights, KV cache and logits.
pub fn decode_step_floor(
    cfg: &Qwen2Config,
    dtype_bytes: usize,
    context_lens: &[usize],
    gb_per_s: f64,
    tflop_per_s: f64,
) -> StepFloor {
    let e = dtype_bytes as f64;
    let batch = context_lens.len() as f64;
    let attended: f64 = context_lens.iter().map(|&c| (c + 1) as f64).sum();
    let (h, v) = (cfg.hidden_size as f64, cfg.vocab_size as f64);
    let layers = cfg.num_hidden_layers as f64;
    let qd = (cfg.num_attention_heads * cfg.head_dim) as f64;

    // Every weight is read once per step (a tied embedding once, as the LM
    // head; the gather of `batch` rows is counted on top).
    let weight_bytes = cfg.param_count() as f64 * e // all parameters
        + batch * h * e; // embedding rows gathered for the new tokens
    let kv_token = cfg.kv_bytes_per_token(dtype_bytes) as f64; // K and V, every layer
    let kv_read_bytes = attended * kv_token; // every cached token of every sequence
    let kv_write_bytes = batch * kv_token; // the new token's K and V
    let logits_bytes = batch * v * e; // [batch, vocab] written by the LM head
    let bytes = weight_bytes + kv_read_bytes + kv_write_bytes + logits_bytes;

    // Matrix weights do 2 flops per weight per token. Norm weights and biases
    // (under 0.1% of the parameters) are counted with them.
    let embed = v * h;
    let head_weights = if cfg.tie_word_embeddings { embed } else { 0.0 };
    let matmul_weights = cfg.param_count() as f64 - embed + head_weights;
    let flops = 2.0 * matmul_weights * batch // projections, MLP, LM head
        + 4.0 * attended * qd * layers; // q.k and p.v for every query head and attended token

    let seconds_memory = bytes / (gb_per_s * 1e9);
    let seconds_compute = flops / (tflop_per_s * 1e12);
    StepFloor {
        weight_bytes,
        kv_read_bytes,
        kv_write_bytes,
        logits_bytes,
        bytes,
        flops,
        seconds_memory,
        seconds_compute,
        seconds: seconds_memory.max(seconds_compute),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_05b_at_batch_256_is_memory_bound_and_sized_right() {
        let cfg = Qwen2Config::preset("qwen2-0.5b").unwrap();
        let f = decode_step_floor(&cfg, 2, &vec![1023; 256], 3000.0, 780.0);
        // 494,032,768 parameters in bf16, plus 256 embedding rows.
        assert!((f.weight_bytes - (494_032_768.0 * 2.0 + 256.0 * 896.0 * 2.0)).abs() < 1.0);
        // 12,288 KV bytes per token: 256 x 1024 attended tokens.
        assert_eq!(f.kv_read_bytes, 256.0 * 1024.0 * 12_288.0);
        assert!(f.seconds_memory > f.seconds_compute);
        // ~4.3 GB at 3 TB/s: about 1.4 ms.
        assert!((1.3e-3..1.6e-3).contains(&f.seconds), "{}", f.seconds);
    }

    #[test]
    fn longer_contexts_cost_more_and_tied_heads_count_once() {
        let cfg = Qwen2Config::preset("qwen2-1.5b").unwrap();
        let short = decode_step_floor(&cfg, 2, &[100; 8], 3000.0, 780.0);
        let long = decode_step_floor(&cfg, 2, &[4000; 8], 3000.0, 780.0);
        assert!(long.bytes > short.bytes && long.flops > short.flops);
        let untied = Qwen2Config::preset("qwen2-7b").unwrap();
        assert!(!untied.tie_word_embeddings);
        let f = decode_step_floor(&untied, 2, &[0], 3000.0, 780.0);
        let embed = (untied.vocab_size * untied.hidden_size) as f64;
        // 7B: the LM head is its own matrix, the embedding is not a matmul.
        let matmul = untied.param_count() as f64 - embed;
        assert!(
            (f.flops
                - (2.0 * matmul
                    + 4.0
                        * (untied.num_attention_heads * untied.head_dim * untied.num_hidden_layers)
                            as f64))
                .abs()
                < 1.0
        );
    }
}
