//! The Qwen2 model configuration: the fields of a Hugging Face `config.json`
//! the engine needs, parsed strictly, plus the three presets we benchmark.
//!
//! Parsing goes through `serde_json::Value` by hand rather than
//! `#[derive(Deserialize)]` so that every error names the key, what was
//! expected and what was found (`num_key_value_heads: expected a positive
//! integer, got "2"`), and so unknown keys (`use_sliding_window`,
//! `max_window_layers`, `transformers_version`, ...) are ignored without a
//! list to keep up to date.
//!
//! Defaults follow `transformers`' `Qwen2Config` only where a default cannot
//! silently produce wrong numbers: `tie_word_embeddings` (false; a checkpoint
//! without `lm_head.weight` is then caught by the weight check), the token ids
//! (optional) and `torch_dtype` (bf16, what every Qwen2 release ships). The
//! shape keys, `rms_norm_eps`, `rope_theta` and `max_position_embeddings` are
//! required: `transformers`' `rope_theta` default (1e4) is not what Qwen2
//! was trained with (1e6), so guessing it would give plausible garbage.

use kernels::DType;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The architecture string `config.json` must list.
pub const ARCHITECTURE: &str = "Qwen2ForCausalLM";

/// Names accepted by [`Qwen2Config::preset`], smallest first.
pub const PRESET_NAMES: [&str; 3] = ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b"];

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read model config {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model config is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("model config: the top level must be a JSON object, got {got}")]
    NotAnObject { got: String },
    #[error("model config: missing key `{key}`")]
    Missing { key: String },
    #[error("model config: `{key}`: expected {expected}, got {got}")]
    Type {
        key: String,
        expected: String,
        got: String,
    },
    #[error("model config: `{key}` must be positive, got 0")]
    Zero { key: String },
    #[error("model config: `architectures` is {found}, which does not contain `{ARCHITECTURE}`")]
    Architecture { found: String },
    #[error(
        "model config: num_attention_heads ({heads}) is not a multiple of \
         num_key_value_heads ({kv_heads}); grouped-query attention needs whole groups"
    )]
    HeadGroups { heads: usize, kv_heads: usize },
    #[error(
        "model config: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) \
         and no head_dim is given"
    )]
    HiddenNotDivisible { hidden: usize, heads: usize },
    #[error(
        "model config: num_attention_heads ({heads}) x head_dim ({head_dim}) = {product} \
         but hidden_size is {hidden}; Qwen2's o_proj maps heads x head_dim back to hidden_size \
         and its q_proj output is used as [heads, head_dim]"
    )]
    HeadDimMismatch {
        hidden: usize,
        heads: usize,
        head_dim: usize,
        product: String,
    },
    #[error(
        "model config: head_dim is {head_dim}; RoPE (NeoX style) rotates pairs, so it must be even"
    )]
    OddHeadDim { head_dim: usize },
    #[error("model config: `{key}` = {value} is not below vocab_size ({vocab})")]
    TokenOutOfRange {
        key: String,
        value: u64,
        vocab: usize,
    },
    #[error("model config: `{key}` = {value} is not supported: {why}")]
    Unsupported {
        key: String,
        value: String,
        why: String,
    },
    #[error("unknown preset `{name}` (known: {known})", known = PRESET_NAMES.join(", "))]
    UnknownPreset { name: String },
}

/// What the engine needs from a Qwen2 `config.json`. Shapes as HF names them;
/// `head_dim` is always filled (HF Qwen2 configs omit it: hidden / heads).
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; each serves `num_attention_heads / num_key_value_heads` query heads.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// When true the LM head reuses `model.embed_tokens.weight` [vocab, hidden].
    pub tie_word_embeddings: bool,
    /// `torch_dtype` (or `dtype`, its newer name); absent means bf16.
    pub torch_dtype: DType,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be one id or a list in HF configs; always a list here.
    pub eos_token_ids: Vec<u32>,
}

impl Qwen2Config {
    /// One of [`PRESET_NAMES`] (case-insensitive), with the shapes of the
    /// released checkpoints and the base models' special tokens
    /// (`<|endoftext|>` = 151643 for bos and eos).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        // (hidden, q heads, kv heads, head_dim, intermediate, layers, vocab, tie)
        let (hidden, heads, kv, hd, inter, layers, vocab, tie) =
            match name.to_ascii_lowercase().as_str() {
                "qwen2-0.5b" => (896, 14, 2, 64, 4864, 24, 151936, true),
                "qwen2-1.5b" => (1536, 12, 2, 128, 8960, 28, 151936, true),
                "qwen2-7b" => (3584, 28, 4, 128, 18944, 28, 152064, false),
                _ => {
                    return Err(ConfigError::UnknownPreset {
                        name: name.to_string(),
                    })
                }
            };
        Ok(Self {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hd,
            vocab_size: vocab,
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tie,
            torch_dtype: DType::BF16,
            bos_token_id: Some(151643),
            eos_token_ids: vec![151643],
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(ConfigError::Json)?;
        let obj = match &value {
            Value::Object(m) => m,
            other => {
                return Err(ConfigError::NotAnObject {
                    got: describe(other),
                })
            }
        };

        check_architectures(obj)?;

        let hidden_size = positive(obj, "hidden_size")?;
        let intermediate_size = positive(obj, "intermediate_size")?;
        let num_hidden_layers = positive(obj, "num_hidden_layers")?;
        let num_attention_heads = positive(obj, "num_attention_heads")?;
        let num_key_value_heads = positive(obj, "num_key_value_heads")?;
        let vocab_size = positive(obj, "vocab_size")?;
        let max_position_embeddings = positive(obj, "max_position_embeddings")?;
        let rms_norm_eps = positive_float(obj, "rms_norm_eps")?;
        // transformers 5 writes `rope_theta` inside `rope_parameters` only;
        // 4.x (the released Qwen2 checkpoints) writes it at the top level.
        let rope_theta = match (
            optional(obj, "rope_theta"),
            optional(obj, "rope_parameters"),
        ) {
            (None, Some(Value::Object(rp))) if rp.contains_key("rope_theta") => {
                positive_float(rp, "rope_theta")?
            }
            _ => positive_float(obj, "rope_theta")?,
        };

        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ConfigError::HeadGroups {
                heads: num_attention_heads,
                kv_heads: num_key_value_heads,
            });
        }

        // Qwen2 configs omit head_dim; transformers then uses hidden / heads.
        // When given it must agree, since the engine reads q_proj's output
        // [tokens, heads * head_dim] as [tokens, heads, head_dim] and o_proj
        // maps heads * head_dim back to hidden.
        let head_dim = match optional(obj, "head_dim") {
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ConfigError::HiddenNotDivisible {
                        hidden: hidden_size,
                        heads: num_attention_heads,
                    });
                }
                hidden_size / num_attention_heads
            }
            Some(_) => {
                let hd = positive(obj, "head_dim")?;
                if num_attention_heads.checked_mul(hd) != Some(hidden_size) {
                    return Err(ConfigError::HeadDimMismatch {
                        hidden: hidden_size,
                        heads: num_attention_heads,
                        head_dim: hd,
                        product: (num_attention_heads as u128 * hd as u128).to_string(),
                    });
                }
                hd
            }
        };
        if head_dim % 2 != 0 {
            return Err(ConfigError::OddHeadDim { head_dim });
        }

        // YaRN / dynamic NTK change the rotation at every position; the RoPE
        // kernel implements plain theta^(-2i/d) frequencies only.
        if let Some(v) = optional(obj, "rope_scaling") {
            return Err(ConfigError::Unsupported {
                key: "rope_scaling".into(),
                value: v.to_string(),
                why: "the engine implements plain RoPE only; remove rope_scaling or set it to null"
                    .into(),
            });
        }

        let tie_word_embeddings = match optional(obj, "tie_word_embeddings") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(type_error("tie_word_embeddings", "true or false", other)),
        };

        // transformers >= 4.56 writes `dtype`; older releases `torch_dtype`.
        let torch_dtype = match (optional(obj, "torch_dtype"), optional(obj, "dtype")) {
            (Some(v), _) => parse_dtype("torch_dtype", v)?,
            (None, Some(v)) => parse_dtype("dtype", v)?,
            (None, None) => DType::BF16,
        };

        let bos_token_id = match optional(obj, "bos_token_id") {
            None => None,
            Some(v) => Some(token_id("bos_token_id", v, vocab_size)?),
        };
        let eos_token_ids = match optional(obj, "eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| token_id("eos_token_id", v, vocab_size))
                .collect::<Result<_, _>>()?,
            Some(v) => vec![token_id("eos_token_id", v, vocab_size)?],
        };

        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            torch_dtype,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// Query heads per key/value head (the GQA group size: 7 for 0.5B and 7B).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters in the checkpoint, counted the way `transformers` does
    /// (a tied LM head counts once). Equals the element count of
    /// [`super::weights::expected_tensors`]; Qwen2-0.5B gives 494,032,768.
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64; // q_proj rows
        let kv = (self.num_key_value_heads * self.head_dim) as u64; // k_proj / v_proj rows
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        // Saturating: dimensions come from a user's file and the product
        // must not panic; real models are far below u64::MAX.
        let m = u64::saturating_mul;
        let per_layer = [
            m(2, h),                           // input_layernorm + post_attention_layernorm [hidden]
            m(q, h).saturating_add(q),         // q_proj weight [q, hidden] + bias [q]
            m(2, m(kv, h).saturating_add(kv)), // k_proj and v_proj weight [kv, hidden] + bias [kv]
            m(h, q),                           // o_proj [hidden, q], no bias
            m(3, m(i, h)), // gate_proj, up_proj [inter, hidden]; down_proj [hidden, inter]
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add);
        let embed = m(v, h); // embed_tokens [vocab, hidden]
        let lm_head = if self.tie_word_embeddings { 0 } else { m(v, h) }; // [vocab, hidden]
        m(self.num_hidden_layers as u64, per_layer)
            .saturating_add(embed)
            .saturating_add(h) // final norm [hidden]
            .saturating_add(lm_head)
    }

    /// KV-cache bytes one token occupies across the whole model:
    /// 2 (K and V) x layers x kv_heads x head_dim x bytes per element.
    /// Qwen2-0.5B in bf16: 2 x 24 x 2 x 64 x 2 = 12,288 bytes.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> u64 {
        [
            self.num_hidden_layers,
            self.num_key_value_heads,
            self.head_dim,
            dtype_bytes,
        ]
        .into_iter()
        .fold(2u64, |acc, x| acc.saturating_mul(x as u64))
    }
}

/// A key's value, treating JSON `null` as absent (HF writes `"rope_scaling": null`).
fn optional<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value, ConfigError> {
    optional(obj, key).ok_or_else(|| ConfigError::Missing { key: key.into() })
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let mut text = v.to_string();
    if text.len() > 60 {
        let cut = (0..=60)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    format!("{kind} {text}")
}

fn type_error(key: &str, expected: &str, got: &Value) -> ConfigError {
    ConfigError::Type {
        key: key.into(),
        expected: expected.into(),
        got: describe(got),
    }
}

fn positive(obj: &Map<String, Value>, key: &str) -> Result<usize, ConfigError> {
    let v = required(obj, key)?;
    let n = v
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| type_error(key, "a positive integer", v))?;
    if n == 0 {
        return Err(ConfigError::Zero { key: key.into() });
    }
    Ok(n)
}

fn positive_float(obj: &Map<String, Value>, key: &str) -> Result<f64, ConfigError> {
    let v = required(obj, key)?;
    match v.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
        Some(0.0) => Err(ConfigError::Zero { key: key.into() }),
        _ => Err(type_error(key, "a positive finite number", v)),
    }
}

fn check_architectures(obj: &Map<String, Value>) -> Result<(), ConfigError> {
    let v = required(obj, "architectures")?;
    let names: Vec<&str> = match v {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        other => return Err(type_error("architectures", "a list of strings", other)),
    };
    if names.contains(&ARCHITECTURE) {
        Ok(())
    } else {
        Err(ConfigError::Architecture {
            found: v.to_string(),
        })
    }
}

fn parse_dtype(key: &str, v: &Value) -> Result<DType, ConfigError> {
    const WANT: &str = "\"bfloat16\", \"float16\" or \"float32\"";
    match v.as_str() {
        Some("bfloat16" | "bf16") => Ok(DType::BF16),
        Some("float16" | "half" | "f16" | "fp16") => Ok(DType::F16),
        Some("float32" | "float" | "f32" | "fp32") => Ok(DType::F32),
        _ => Err(type_error(key, WANT, v)),
    }
}

fn token_id(key: &str, v: &Value, vocab: usize) -> Result<u32, ConfigError> {
    let id = v.as_u64().ok_or_else(|| {
        type_error(
            key,
            "a token id (non-negative integer) or a list of them",
            v,
        )
    })?;
    if id >= vocab as u64 {
        return Err(ConfigError::TokenOutOfRange {
            key: key.into(),
            value: id,
            vocab,
        });
    }
    // vocab fits in usize; an id below it that does not fit u32 is still absurd.
    u32::try_from(id).map_err(|_| type_error(key, "a token id below 2^32", v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Qwen/Qwen2-0.5B's config.json as published (transformers 4.40 era).
    const QWEN2_05B_JSON: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"],
      "attention_dropout": 0.0,
      "bos_token_id": 151643,
      "eos_token_id": 151643,
      "hidden_act": "silu",
      "hidden_size": 896,
      "initializer_range": 0.02,
      "intermediate_size": 4864,
      "max_position_embeddings": 131072,
      "max_window_layers": 24,
      "model_type": "qwen2",
      "num_attention_heads": 14,
      "num_hidden_layers": 24,
      "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0,
      "sliding_window": 131072,
      "tie_word_embeddings": true,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.40.1",
      "use_cache": true,
      "use_sliding_window": false,
      "vocab_size": 151936
    }"#;

    fn edited(f: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(QWEN2_05B_JSON).unwrap();
        f(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn err_of(json: &str) -> String {
        Qwen2Config::from_json_str(json).unwrap_err().to_string()
    }

    #[test]
    fn presets_have_the_released_shapes() {
        // (name, hidden, heads, kv, head_dim, inter, layers, vocab, tie)
        let want = [
            ("qwen2-0.5b", 896, 14, 2, 64, 4864, 24, 151936, true),
            ("qwen2-1.5b", 1536, 12, 2, 128, 8960, 28, 151936, true),
            ("qwen2-7b", 3584, 28, 4, 128, 18944, 28, 152064, false),
        ];
        for (name, h, q, kv, hd, i, l, v, tie) in want {
            let c = Qwen2Config::preset(name).unwrap();
            assert_eq!(
                (
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    c.intermediate_size,
                    c.num_hidden_layers,
                    c.vocab_size,
                    c.tie_word_embeddings
                ),
                (h, q, kv, hd, i, l, v, tie),
                "{name}"
            );
            assert_eq!(c.rms_norm_eps, 1e-6);
            assert_eq!(c.rope_theta, 1e6);
            assert_eq!(c.max_position_embeddings, 32768);
            assert_eq!(c.torch_dtype, DType::BF16);
            assert_eq!(c.num_attention_heads * c.head_dim, c.hidden_size);
        }
        assert_eq!(Qwen2Config::preset("Qwen2-7B").unwrap().group_size(), 7);
    }

    #[test]
    fn param_counts_match_transformers() {
        // model.num_parameters() for the released checkpoints.
        let count = |n| Qwen2Config::preset(n).unwrap().param_count();
        assert_eq!(count("qwen2-0.5b"), 494_032_768);
        assert_eq!(count("qwen2-1.5b"), 1_543_714_304);
        assert_eq!(count("qwen2-7b"), 7_615_616_512);
    }

    #[test]
    fn kv_bytes_per_token_formula() {
        let c = Qwen2Config::preset("qwen2-0.5b").unwrap();
        assert_eq!(c.kv_bytes_per_token(2), 2 * 24 * 2 * 64 * 2);
        let c = Qwen2Config::preset("qwen2-7b").unwrap();
        assert_eq!(c.kv_bytes_per_token(2), 57_344);
        assert_eq!(c.kv_bytes_per_token(4), 2 * 57_344);
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let e = Qwen2Config::preset("qwen2-72b").unwrap_err().to_string();
        assert!(e.contains("qwen2-72b"), "{e}");
        for n in PRESET_NAMES {
            assert!(e.contains(n), "{e}");
        }
    }

    #[test]
    fn parses_the_real_qwen2_05b_config() {
        let c = Qwen2Config::from_json_str(QWEN2_05B_JSON).unwrap();
        let preset = Qwen2Config::preset("qwen2-0.5b").unwrap();
        // The published file says 131072 positions; everything else is the preset.
        assert_eq!(c.max_position_embeddings, 131072);
        assert_eq!(
            c,
            Qwen2Config {
                max_position_embeddings: 131072,
                ..preset
            }
        );
    }

    #[test]
    fn eos_may_be_a_list_and_defaults_apply() {
        let json = edited(|m| {
            m.insert("eos_token_id".into(), serde_json::json!([151645, 151643]));
            m.remove("torch_dtype");
            m.remove("tie_word_embeddings");
            m.remove("bos_token_id");
        });
        let c = Qwen2Config::from_json_str(&json).unwrap();
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
        assert_eq!(c.torch_dtype, DType::BF16);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, None);
    }

    #[test]
    fn dtype_key_and_explicit_head_dim() {
        let json = edited(|m| {
            m.remove("torch_dtype");
            m.insert("dtype".into(), "float16".into());
            m.insert("head_dim".into(), 64.into());
        });
        let c = Qwen2Config::from_json_str(&json).unwrap();
        assert_eq!(c.torch_dtype, DType::F16);
        assert_eq!(c.head_dim, 64);
        let json = edited(|m| {
            m.insert("torch_dtype".into(), "float32".into());
        });
        assert_eq!(
            Qwen2Config::from_json_str(&json).unwrap().torch_dtype,
            DType::F32
        );
    }

    #[test]
    fn missing_keys_are_named() {
        for key in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "architectures",
        ] {
            let e = err_of(&edited(|m| {
                m.remove(key);
            }));
            assert!(e.contains("missing key") && e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn wrong_types_name_key_expected_and_got() {
        let e = err_of(&edited(|m| {
            m.insert("num_key_value_heads".into(), "2".into());
        }));
        assert!(e.contains("`num_key_value_heads`"), "{e}");
        assert!(e.contains("positive integer") && e.contains("\"2\""), "{e}");

        let e = err_of(&edited(|m| {
            m.insert("hidden_size".into(), serde_json::json!(896.5));
        }));
        assert!(e.contains("`hidden_size`") && e.contains("896.5"), "{e}");

        let e = err_of(&edited(|m| {
            m.insert("rope_theta".into(), "1e6".into());
        }));
        assert!(e.contains("`rope_theta`") && e.contains("number"), "{e}");

        let e = err_of(&edited(|m| {
            m.insert("tie_word_embeddings".into(), 1.into());
        }));
        assert!(
            e.contains("`tie_word_embeddings`") && e.contains("true or false"),
            "{e}"
        );

        let e = err_of(&edited(|m| {
            m.insert("torch_dtype".into(), "float8_e4m3fn".into());
        }));
        assert!(
            e.contains("`torch_dtype`") && e.contains("float8_e4m3fn"),
            "{e}"
        );

        let e = err_of(&edited(|m| {
            m.insert("eos_token_id".into(), serde_json::json!([151643, "x"]));
        }));
        assert!(e.contains("`eos_token_id`") && e.contains("\"x\""), "{e}");

        let e = err_of(&edited(|m| {
            m.insert("architectures".into(), "Qwen2ForCausalLM".into());
        }));
        assert!(e.contains("`architectures`") && e.contains("list"), "{e}");

        let e = err_of("[1, 2]");
        assert!(e.contains("JSON object"), "{e}");
        let e = err_of("{ not json");
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn wrong_architecture_names_what_was_found() {
        let e = err_of(&edited(|m| {
            m.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
        }));
        assert!(
            e.contains("LlamaForCausalLM") && e.contains(ARCHITECTURE),
            "{e}"
        );
    }

    #[test]
    fn zero_dims_are_rejected_by_name() {
        for key in [
            "hidden_size",
            "num_key_value_heads",
            "vocab_size",
            "rms_norm_eps",
        ] {
            let e = err_of(&edited(|m| {
                m.insert(key.into(), 0.into());
            }));
            assert!(e.contains(key) && e.contains("positive"), "{key}: {e}");
        }
    }

    #[test]
    fn head_groups_must_divide() {
        let e = err_of(&edited(|m| {
            m.insert("num_key_value_heads".into(), 4.into());
        }));
        assert!(e.contains("num_attention_heads (14)"), "{e}");
        assert!(e.contains("num_key_value_heads (4)"), "{e}");
    }

    #[test]
    fn head_dim_must_agree_with_hidden() {
        let e = err_of(&edited(|m| {
            m.insert("head_dim".into(), 128.into());
        }));
        assert!(
            e.contains("head_dim (128)") && e.contains("hidden_size is 896"),
            "{e}"
        );

        let e = err_of(&edited(|m| {
            m.insert("hidden_size".into(), 900.into());
        }));
        assert!(e.contains("hidden_size (900)") && e.contains("(14)"), "{e}");

        // 14 heads x 7 = 98: divisible, but an odd head_dim cannot be rotated in pairs.
        let e = err_of(&edited(|m| {
            m.insert("hidden_size".into(), 98.into());
        }));
        assert!(e.contains("head_dim is 7"), "{e}");
    }

    #[test]
    fn rope_theta_is_read_from_rope_parameters_as_transformers_5_writes_it() {
        let mut m = match serde_json::from_str::<Value>(QWEN2_05B_JSON).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        m.remove("rope_theta");
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 1000000.0}),
        );
        let c = Qwen2Config::from_json_str(&Value::Object(m.clone()).to_string()).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        m.remove("rope_parameters");
        let e = Qwen2Config::from_json_str(&Value::Object(m).to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_theta"), "{e}");
    }

    #[test]
    fn rope_scaling_is_refused_and_null_is_absent() {
        let e = err_of(&edited(|m| {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({"type": "yarn", "factor": 4.0}),
            );
        }));
        assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
        let ok = edited(|m| {
            m.insert("rope_scaling".into(), Value::Null);
            m.insert("head_dim".into(), Value::Null);
        });
        assert_eq!(Qwen2Config::from_json_str(&ok).unwrap().head_dim, 64);
    }

    #[test]
    fn token_ids_must_be_in_vocab() {
        let e = err_of(&edited(|m| {
            m.insert("bos_token_id".into(), 151936.into());
        }));
        assert!(e.contains("`bos_token_id`") && e.contains("151936"), "{e}");
    }

    #[test]
    fn from_file_names_the_path() {
        let path = std::env::temp_dir().join(format!(
            "workbench-config-test-{}-missing/config.json",
            std::process::id()
        ));
        let e = Qwen2Config::from_file(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");

        let dir =
            std::env::temp_dir().join(format!("workbench-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, QWEN2_05B_JSON).unwrap();
        let c = Qwen2Config::from_file(&file);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.unwrap().hidden_size, 896);
    }

    proptest! {
        /// Any consistent shape survives a trip through config.json, and the
        /// parameter count equals the expected tensors' element count.
        #[test]
        fn json_round_trip_and_param_count(
            kv in 1usize..5, group in 1usize..8, half_hd in 1usize..40,
            inter in 1usize..300, layers in 1usize..5, vocab in 1usize..500,
            tie in any::<bool>(),
        ) {
            let heads = kv * group;
            let hd = 2 * half_hd;
            let json = serde_json::json!({
                "architectures": [ARCHITECTURE],
                "hidden_size": heads * hd, "intermediate_size": inter,
                "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv, "vocab_size": vocab,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 10000, "tie_word_embeddings": tie,
            });
            let c = Qwen2Config::from_json_str(&json.to_string()).unwrap();
            prop_assert_eq!(c.head_dim, hd);
            prop_assert_eq!(c.rope_theta, 10000.0);
            let elements: u64 = crate::engine::weights::expected_tensors(&c)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            prop_assert_eq!(c.param_count(), elements);
        }
    }
}
