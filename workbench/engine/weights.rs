//! A Qwen2 checkpoint's safetensors, memory-mapped and checked against a
//! [`Qwen2Config`] before anything is uploaded: every tensor the model needs
//! is present with the right shape, nothing unknown is there, and all share
//! one dtype (BF16, F16 or F32).
//!
//! Layouts accepted (what `transformers` writes): one `model.safetensors`,
//! or `model.safetensors.index.json` whose `weight_map` sends each tensor
//! name to a shard file in the same directory. The single file wins when
//! both exist, as in `transformers`.
//!
//! Storage: each file is mapped once and kept in [`Checkpoint`]; tensor
//! byte ranges are computed from the header when the file is opened (the
//! safetensors crate validates that the ranges tile the data section
//! exactly), so [`Checkpoint::tensor_bytes`] is a slice of the mapping with
//! no copy, no re-parse and no self-referential borrow.
//!
//! The checkpoint's own dtype is what [`Checkpoint::dtype`] reports; the
//! config's `torch_dtype` is not required to agree (`transformers` also
//! loads what the file holds under `torch_dtype="auto"`).

use super::config::Qwen2Config;
use kernels::DType;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tied LM head's name; optional when `tie_word_embeddings`.
const LM_HEAD: &str = "lm_head.weight";

/// Tensors some exporters leave in checkpoints that the model recomputes:
/// older `transformers` saved RoPE's inverse frequencies as a buffer.
fn harmless_extra(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

#[derive(Debug, Error)]
pub enum WeightsError {
    #[error(
        "{}: neither {SINGLE_FILE} nor {INDEX_FILE} is there; pass the checkpoint directory",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: {len} bytes, too short for a safetensors file (it starts with an 8-byte header \
         length); truncated download?",
        file.display()
    )]
    TooShort { file: PathBuf, len: u64 },
    #[error(
        "{}: the header length field says {header_len} bytes, past the end of the \
         {file_len}-byte file: truncated, or not a safetensors file",
        file.display()
    )]
    HeaderPastEnd {
        file: PathBuf,
        header_len: u64,
        file_len: u64,
    },
    #[error("{}: not a valid safetensors file: {source}{}", file.display(), format_hint(.source))]
    Format {
        file: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("{}: {problem}", file.display())]
    Index { file: PathBuf, problem: String },
    #[error(
        "{}: shard {shard} does not exist ({count} tensors are mapped to it, e.g. {tensor}); \
         the download is incomplete",
        index.display()
    )]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
        count: usize,
    },
    #[error(
        "{}: weight_map puts {tensor} in {shard}, but that file does not hold it",
        index.display()
    )]
    IndexMismatch {
        index: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("tensor {tensor} is in both {} and {}", first.display(), second.display())]
    Duplicate {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "checkpoint {}: missing tensor {tensor} ({missing} of the {expected} tensors this \
         config needs are missing); does config.json match these weights?",
        dir.display()
    )]
    Missing {
        dir: PathBuf,
        tensor: String,
        missing: usize,
        expected: usize,
    },
    #[error(
        "{}: unexpected tensor {tensor} ({count} unexpected in all); does config.json match \
         these weights?",
        file.display()
    )]
    Unexpected {
        file: PathBuf,
        tensor: String,
        count: usize,
    },
    #[error("{}: tensor {tensor} has shape {actual:?}, expected {expected:?}", file.display())]
    Shape {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{}: tensor {tensor} is {dtype}; the engine loads BF16, F16 or F32", file.display())]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error(
        "tensor {tensor} is {dtype} but {first_tensor} is {first_dtype}; all weights must \
         share one dtype"
    )]
    MixedDtype {
        tensor: String,
        dtype: DType,
        first_tensor: String,
        first_dtype: DType,
    },
    #[error("no tensor named {name} in the checkpoint")]
    UnknownTensor { name: String },
}

/// What to do about the safetensors errors a damaged download produces.
fn format_hint(e: &SafeTensorError) -> &'static str {
    match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            " (the data section is shorter or longer than the header says: the file is \
             truncated or has trailing bytes; download it again)"
        }
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            " (the 8-byte header length is not plausible: not a safetensors file, or corrupt)"
        }
        _ => "",
    }
}

/// The tensors a Qwen2 checkpoint holds, with Hugging Face names and
/// row-major shapes, in model order. With `tie_word_embeddings`
/// `lm_head.weight` is left out (the embedding serves as the LM head).
pub fn expected_tensors(cfg: &Qwen2Config) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim; // q_proj output: [heads, head_dim] flattened
    let kv = cfg.num_key_value_heads * cfg.head_dim; // k/v_proj output: [kv_heads, head_dim]
    let i = cfg.intermediate_size;
    let v = cfg.vocab_size;

    let mut out = Vec::with_capacity(2 + 12 * cfg.num_hidden_layers + 1);
    out.push(("model.embed_tokens.weight".to_string(), vec![v, h]));
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        // nn.Linear stores weight as [out_features, in_features].
        let layer = [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]), // no bias in Qwen2
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ];
        out.extend(layer.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![v, h]));
    }
    out
}

/// One mapped file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where a tensor's bytes are: `mmap[start..end]` of `shards[shard]`.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A validated, memory-mapped checkpoint.
pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
    dtype: DType,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files())
            .field("tensors", &self.tensors.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Checkpoint {
    /// Map `dir`'s safetensors and check them against `cfg` (see the module docs).
    pub fn open(dir: &Path, cfg: &Qwen2Config) -> Result<Self, WeightsError> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let (paths, weight_map) = if single.is_file() {
            (vec![single], None)
        } else if index.is_file() {
            let (paths, map) = read_index(dir, &index)?;
            (paths, Some(map))
        } else {
            return Err(WeightsError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };

        let mut shards = Vec::with_capacity(paths.len());
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        for path in paths {
            let (mmap, entries) = map_shard(&path)?;
            let shard = shards.len();
            for (name, mut entry) in entries {
                if harmless_extra(&name) {
                    continue;
                }
                if let Some(prev) = tensors.get(&name) {
                    return Err(WeightsError::Duplicate {
                        tensor: name,
                        first: shards_path(&shards, prev.shard, &path),
                        second: path,
                    });
                }
                entry.shard = shard;
                tensors.insert(name, entry);
            }
            shards.push(Shard { path, mmap });
        }

        if let Some(map) = weight_map {
            for (tensor, shard_name) in map {
                if harmless_extra(&tensor) {
                    continue;
                }
                let holds = tensors.get(&tensor).is_some_and(|e| {
                    shards[e.shard].path.file_name() == Some(std::ffi::OsStr::new(&shard_name))
                });
                if !holds {
                    return Err(WeightsError::IndexMismatch {
                        index,
                        tensor,
                        shard: shard_name,
                    });
                }
            }
        }

        let dtype = validate(dir, cfg, &shards, &tensors)?;
        Ok(Self {
            shards,
            tensors,
            dtype,
        })
    }

    /// The one dtype every tensor has.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Tensor names, sorted; harmless extras (`*.rotary_emb.inv_freq`) are not listed.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn shape(&self, name: &str) -> Result<&[usize], WeightsError> {
        Ok(&self.entry(name)?.shape)
    }

    /// The tensor's raw little-endian bytes, row-major, straight from the
    /// mapping. Their address is 8-byte aligned only if the tensor's offset
    /// is; copy before reinterpreting as `bf16`/`f32`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], WeightsError> {
        let e = self.entry(name)?;
        // In bounds: read_metadata checked that the header's ranges tile the
        // data section exactly and that it ends at the end of the mapping.
        Ok(&self.shards[e.shard].mmap[e.start..e.end])
    }

    /// The tensor widened to f32 (bf16 and f16 exactly; f32 as stored).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, WeightsError> {
        let b = self.tensor_bytes(name)?;
        Ok(match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    /// The mapped files, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightsError> {
        self.tensors
            .get(name)
            .ok_or_else(|| WeightsError::UnknownTensor { name: name.into() })
    }
}

/// The path of an already-mapped shard (or `fallback` if the index is stale).
fn shards_path(shards: &[Shard], i: usize, fallback: &Path) -> PathBuf {
    shards
        .get(i)
        .map_or_else(|| fallback.to_path_buf(), |s| s.path.clone())
}

/// Parse `model.safetensors.index.json`: the shard files (sorted, each once,
/// each checked to exist) and the tensor -> shard map.
fn read_index(
    dir: &Path,
    index: &Path,
) -> Result<(Vec<PathBuf>, BTreeMap<String, String>), WeightsError> {
    let bad = |problem: String| WeightsError::Index {
        file: index.to_path_buf(),
        problem,
    };
    let text = std::fs::read_to_string(index).map_err(|source| WeightsError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(raw) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("has no `weight_map` object".into()));
    };

    let mut map = BTreeMap::new();
    // shard file name -> (tensor count, first tensor), for the missing-shard message
    let mut per_shard: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (tensor, shard) in raw {
        let Some(shard) = shard.as_str() else {
            return Err(bad(format!(
                "weight_map entry for {tensor} is {shard}, expected a file name"
            )));
        };
        // Only plain file names in this directory: the index must not point
        // elsewhere on disk (`../x`, `/etc/...`).
        let plain = !shard.is_empty()
            && Path::new(shard).file_name() == Some(std::ffi::OsStr::new(shard))
            && !shard.contains(['/', '\\']);
        if !plain {
            return Err(bad(format!(
                "weight_map puts {tensor} in `{shard}`, which is not a file name in this directory"
            )));
        }
        let slot = per_shard
            .entry(shard.to_string())
            .or_insert_with(|| (0, tensor.clone()));
        slot.0 += 1;
        map.insert(tensor.clone(), shard.to_string());
    }

    let mut paths = Vec::with_capacity(per_shard.len());
    for (shard, (count, tensor)) in per_shard {
        let path = dir.join(&shard);
        if !path.is_file() {
            return Err(WeightsError::MissingShard {
                index: index.to_path_buf(),
                shard,
                tensor,
                count,
            });
        }
        paths.push(path);
    }
    Ok((paths, map))
}

/// Map one safetensors file and read its header: (mapping, [(name, entry)]).
fn map_shard(path: &Path) -> Result<(Mmap, Vec<(String, Entry)>), WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    // Checked before mapping: a zero-length file cannot be mapped everywhere.
    if len < 8 {
        return Err(WeightsError::TooShort {
            file: path.to_path_buf(),
            len,
        });
    }
    // SAFETY: the mapping is read-only and lives as long as the Checkpoint.
    // The file must not be modified or truncated while mapped (by another
    // process, or a re-download into the same HF cache blob): the bytes
    // would change under us, and reading a truncated page raises SIGBUS.
    // Every loader that maps checkpoints (safetensors, candle, vLLM) makes
    // the same assumption.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;

    // Our own check first: a clearer message than the crate's for the
    // common corruption (a partial download cut inside the header).
    let mut head = [0u8; 8];
    if let Some(first) = mmap.get(..8) {
        head.copy_from_slice(first);
    } else {
        return Err(WeightsError::TooShort {
            file: path.to_path_buf(),
            len: mmap.len() as u64,
        });
    }
    let header_len = u64::from_le_bytes(head);
    let file_len = mmap.len() as u64;
    if header_len > file_len - 8 {
        return Err(WeightsError::HeaderPastEnd {
            file: path.to_path_buf(),
            header_len,
            file_len,
        });
    }

    let (n, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|source| WeightsError::Format {
            file: path.to_path_buf(),
            source,
        })?;
    // Layout: [u64 n][n bytes JSON header][data]; offsets are relative to data.
    let base = 8 + n;
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let entry = Entry {
                shard: 0,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: base + info.data_offsets.0,
                end: base + info.data_offsets.1,
            };
            (name, entry)
        })
        .collect();
    Ok((mmap, entries))
}

/// Presence, absence, shapes and one dtype; returns that dtype.
fn validate(
    dir: &Path,
    cfg: &Qwen2Config,
    shards: &[Shard],
    tensors: &BTreeMap<String, Entry>,
) -> Result<DType, WeightsError> {
    let expected = expected_tensors(cfg);
    let file_of = |e: &Entry| shards_path(shards, e.shard, dir);

    let missing: Vec<&str> = expected
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !tensors.contains_key(*n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(WeightsError::Missing {
            dir: dir.to_path_buf(),
            tensor: first.to_string(),
            missing: missing.len(),
            expected: expected.len(),
        });
    }

    let known: HashMap<&str, &[usize]> = expected
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let tied_head = cfg.tie_word_embeddings && tensors.contains_key(LM_HEAD);
    let unexpected: Vec<(&String, &Entry)> = tensors
        .iter()
        .filter(|(n, _)| {
            let allowed = known.contains_key(n.as_str()) || (tied_head && *n == LM_HEAD);
            !allowed
        })
        .collect();
    if let Some((name, e)) = unexpected.first() {
        return Err(WeightsError::Unexpected {
            file: file_of(e),
            tensor: name.to_string(),
            count: unexpected.len(),
        });
    }

    // A tied checkpoint that still ships lm_head.weight must ship it whole.
    let lm_head_shape = [cfg.vocab_size, cfg.hidden_size];
    let mut checks: Vec<(&str, &[usize])> = expected
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    if tied_head {
        checks.push((LM_HEAD, &lm_head_shape));
    }

    let mut first: Option<(&str, DType)> = None;
    // Every name in `checks` is present (missing ones returned above).
    for (name, want) in checks {
        let Some(e) = tensors.get(name) else {
            continue;
        };
        if e.shape != want {
            return Err(WeightsError::Shape {
                file: file_of(e),
                tensor: name.into(),
                expected: want.to_vec(),
                actual: e.shape.clone(),
            });
        }
        let dtype = match e.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    file: file_of(e),
                    tensor: name.into(),
                    dtype: other.to_string(),
                })
            }
        };
        match first {
            None => first = Some((name, dtype)),
            Some((first_tensor, first_dtype)) if first_dtype != dtype => {
                return Err(WeightsError::MixedDtype {
                    tensor: name.into(),
                    dtype,
                    first_tensor: first_tensor.into(),
                    first_dtype,
                })
            }
            Some(_) => {}
        }
    }
    // `expected` always holds the embedding, so `first` is set here.
    first.map(|(_, d)| d).ok_or(WeightsError::Missing {
        dir: dir.to_path_buf(),
        tensor: "model.embed_tokens.weight".into(),
        missing: 1,
        expected: expected.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "workbench-weights-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// hidden 8, heads 2/1, head_dim 4, inter 16, layers 2, vocab 32.
    fn tiny(tie: bool) -> Qwen2Config {
        Qwen2Config {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            vocab_size: 32,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tie,
            torch_dtype: DType::BF16,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// name, dtype, shape, raw bytes
    type T = (String, Dtype, Vec<usize>, Vec<u8>);

    /// Distinct bytes per tensor (by `seed`) so a wrong slice is caught.
    fn tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u8) -> T {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let bytes = (0..n)
            .map(|k| {
                (k as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed.wrapping_mul(7))
            })
            .collect();
        (name.to_string(), dtype, shape.to_vec(), bytes)
    }

    fn full(cfg: &Qwen2Config, dtype: Dtype) -> Vec<T> {
        expected_tensors(cfg)
            .iter()
            .enumerate()
            .map(|(i, (n, s))| tensor(n, dtype, s, i as u8))
            .collect()
    }

    fn write(path: &Path, ts: &[T]) {
        let views: Vec<(String, TensorView<'_>)> = ts
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// Write `ts` as model.safetensors in a new dir and open it against `cfg`.
    fn open_single(
        tag: &str,
        cfg: &Qwen2Config,
        ts: &[T],
    ) -> (TempDir, Result<Checkpoint, WeightsError>) {
        let t = TempDir::new(tag);
        write(&t.0.join(SINGLE_FILE), ts);
        let r = Checkpoint::open(&t.0, cfg);
        (t, r)
    }

    fn err_single(tag: &str, cfg: &Qwen2Config, ts: &[T]) -> (WeightsError, String) {
        let (_t, r) = open_single(tag, cfg, ts);
        let e = r.unwrap_err();
        let msg = e.to_string();
        (e, msg)
    }

    fn set_tensor(ts: &mut [T], t: T) {
        let slot = ts.iter_mut().find(|x| x.0 == t.0).unwrap();
        *slot = t;
    }

    #[test]
    fn expected_names_and_shapes() {
        let cfg = tiny(false);
        let e = expected_tensors(&cfg);
        assert_eq!(e.len(), 1 + 12 * 2 + 1 + 1);
        let get = |n: &str| {
            e.iter()
                .find(|(x, _)| x == n)
                .map(|(_, s)| s.clone())
                .unwrap()
        };
        assert_eq!(get("model.embed_tokens.weight"), vec![32, 8]);
        assert_eq!(get("model.layers.1.self_attn.q_proj.weight"), vec![8, 8]);
        assert_eq!(get("model.layers.1.self_attn.q_proj.bias"), vec![8]);
        assert_eq!(get("model.layers.0.self_attn.k_proj.weight"), vec![4, 8]);
        assert_eq!(get("model.layers.0.self_attn.v_proj.bias"), vec![4]);
        assert_eq!(get("model.layers.0.self_attn.o_proj.weight"), vec![8, 8]);
        assert_eq!(get("model.layers.0.mlp.gate_proj.weight"), vec![16, 8]);
        assert_eq!(get("model.layers.0.mlp.down_proj.weight"), vec![8, 16]);
        assert_eq!(get("model.norm.weight"), vec![8]);
        assert_eq!(get(LM_HEAD), vec![32, 8]);
        assert!(!e.iter().any(|(n, _)| n.contains("o_proj.bias")));
        assert!(!expected_tensors(&tiny(true))
            .iter()
            .any(|(n, _)| n == LM_HEAD));
        // 7B: k_proj [512, 3584], o_proj [3584, 3584].
        let c7 = Qwen2Config::preset("qwen2-7b").unwrap();
        let e7 = expected_tensors(&c7);
        assert!(e7.contains(&(
            "model.layers.27.self_attn.k_proj.weight".into(),
            vec![512, 3584]
        )));
        assert_eq!(e7.len(), 1 + 12 * 28 + 1 + 1);
    }

    #[test]
    fn valid_checkpoint_opens_and_serves_its_bytes() {
        let cfg = tiny(true);
        let ts = full(&cfg, Dtype::BF16);
        let (t, r) = open_single("valid", &cfg, &ts);
        let ck = r.unwrap();
        assert_eq!(ck.dtype(), DType::BF16);
        assert_eq!(ck.names().len(), ts.len());
        assert_eq!(ck.files(), vec![t.0.join(SINGLE_FILE).as_path()]);
        for (name, _, shape, bytes) in &ts {
            assert_eq!(ck.tensor_bytes(name).unwrap(), bytes.as_slice(), "{name}");
            assert_eq!(ck.shape(name).unwrap(), shape.as_slice());
        }
        let e = ck.tensor_bytes("lm_head.weight").unwrap_err().to_string();
        assert!(e.contains("lm_head.weight"), "{e}");
    }

    #[test]
    fn f32_and_f16_checkpoints_report_their_dtype() {
        let cfg = tiny(true);
        for (st, want) in [(Dtype::F32, DType::F32), (Dtype::F16, DType::F16)] {
            let (_t, r) = open_single("dtypes", &cfg, &full(&cfg, st));
            assert_eq!(r.unwrap().dtype(), want);
        }
    }

    #[test]
    fn untied_config_needs_lm_head() {
        let ts = full(&tiny(true), Dtype::BF16);
        let (e, msg) = err_single("untied", &tiny(false), &ts);
        assert!(matches!(e, WeightsError::Missing { .. }), "{msg}");
        assert!(msg.contains("missing tensor lm_head.weight"), "{msg}");
        assert!(msg.contains("1 of the 27"), "{msg}");
        let mut ts = ts;
        ts.push(tensor(LM_HEAD, Dtype::BF16, &[32, 8], 99));
        let (_t, r) = open_single("untied-ok", &tiny(false), &ts);
        assert!(r.unwrap().names().contains(&LM_HEAD));
    }

    #[test]
    fn tied_lm_head_is_optional_but_must_have_its_shape() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        ts.push(tensor(LM_HEAD, Dtype::BF16, &[32, 8], 99));
        let (_t, r) = open_single("tied-head", &cfg, &ts);
        assert!(r.unwrap().names().contains(&LM_HEAD));
        set_tensor(&mut ts, tensor(LM_HEAD, Dtype::BF16, &[32, 9], 99));
        let (e, msg) = err_single("tied-head-bad", &cfg, &ts);
        assert!(matches!(e, WeightsError::Shape { .. }), "{msg}");
        assert!(
            msg.contains(LM_HEAD) && msg.contains("[32, 9]") && msg.contains("[32, 8]"),
            "{msg}"
        );
    }

    #[test]
    fn rotary_inv_freq_is_ignored() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        let inv = "model.layers.0.self_attn.rotary_emb.inv_freq";
        ts.push(tensor(inv, Dtype::F32, &[2], 5));
        let (_t, r) = open_single("invfreq", &cfg, &ts);
        let ck = r.unwrap();
        assert_eq!(ck.dtype(), DType::BF16);
        assert!(!ck.names().contains(&inv));
    }

    #[test]
    fn missing_tensor_is_named_with_a_count() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
        let (e, msg) = err_single("missing1", &cfg, &ts);
        assert!(matches!(e, WeightsError::Missing { .. }), "{msg}");
        assert!(msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
        assert!(msg.contains("1 of the 26"), "{msg}");

        ts.retain(|t| !t.0.starts_with("model.layers.0.self_attn.q_proj"));
        ts.retain(|t| t.0 != "model.norm.weight");
        let (_, msg) = err_single("missing4", &cfg, &ts);
        // The first missing in model order, and all four counted.
        assert!(
            msg.contains("missing tensor model.layers.0.self_attn.q_proj.weight"),
            "{msg}"
        );
        assert!(msg.contains("4 of the 26"), "{msg}");
    }

    #[test]
    fn unexpected_tensor_is_named() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        ts.push(tensor(
            "model.layers.2.mlp.gate_proj.weight",
            Dtype::BF16,
            &[16, 8],
            1,
        ));
        ts.push(tensor(
            "model.layers.0.self_attn.o_proj.bias",
            Dtype::BF16,
            &[8],
            2,
        ));
        let (e, msg) = err_single("extra", &cfg, &ts);
        assert!(
            matches!(e, WeightsError::Unexpected { count: 2, .. }),
            "{msg}"
        );
        // Sorted order: layers.0 comes first.
        assert!(
            msg.contains("model.layers.0.self_attn.o_proj.bias"),
            "{msg}"
        );
        assert!(msg.contains(SINGLE_FILE), "{msg}");
    }

    #[test]
    fn wrong_shape_names_tensor_expected_and_actual() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        let name = "model.layers.1.self_attn.q_proj.bias";
        set_tensor(&mut ts, tensor(name, Dtype::BF16, &[9], 3));
        let (e, msg) = err_single("shape", &cfg, &ts);
        assert!(matches!(e, WeightsError::Shape { .. }), "{msg}");
        assert!(
            msg.contains(name) && msg.contains("[9]") && msg.contains("expected [8]"),
            "{msg}"
        );
        // Transposed weights are caught too: down_proj [hidden, inter], not [inter, hidden].
        let mut ts = full(&cfg, Dtype::BF16);
        let name = "model.layers.0.mlp.down_proj.weight";
        set_tensor(&mut ts, tensor(name, Dtype::BF16, &[16, 8], 3));
        let (_, msg) = err_single("transposed", &cfg, &ts);
        assert!(
            msg.contains(name) && msg.contains("[16, 8]") && msg.contains("[8, 16]"),
            "{msg}"
        );
    }

    #[test]
    fn mixed_dtype_names_both_tensors() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        let name = "model.layers.1.mlp.down_proj.weight";
        set_tensor(&mut ts, tensor(name, Dtype::F16, &[8, 16], 4));
        let (e, msg) = err_single("mixed", &cfg, &ts);
        assert!(matches!(e, WeightsError::MixedDtype { .. }), "{msg}");
        assert!(msg.contains(name) && msg.contains("f16"), "{msg}");
        assert!(
            msg.contains("model.embed_tokens.weight") && msg.contains("bf16"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        set_tensor(&mut ts, tensor("model.norm.weight", Dtype::F64, &[8], 4));
        let (e, msg) = err_single("f64", &cfg, &ts);
        assert!(matches!(e, WeightsError::UnsupportedDtype { .. }), "{msg}");
        assert!(
            msg.contains("model.norm.weight") && msg.contains("F64"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_file_names_the_file() {
        let cfg = tiny(true);
        let t = TempDir::new("truncated");
        let path = t.0.join(SINGLE_FILE);
        write(&path, &full(&cfg, Dtype::BF16));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, WeightsError::Format { .. }), "{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("truncated"),
            "{msg}"
        );
        // Cut inside the header: the length field now points past the end.
        std::fs::write(&path, &bytes[..20]).unwrap();
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        assert!(matches!(e, WeightsError::HeaderPastEnd { .. }), "{e}");
        // Cut inside the length field itself.
        std::fs::write(&path, &bytes[..3]).unwrap();
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        assert!(matches!(e, WeightsError::TooShort { len: 3, .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn header_length_past_the_end_names_the_file() {
        let cfg = tiny(true);
        let t = TempDir::new("hugeheader");
        let path = t.0.join(SINGLE_FILE);
        write(&path, &full(&cfg, Dtype::BF16));
        let mut bytes = std::fs::read(&path).unwrap();
        let huge = u64::MAX - 7;
        bytes[..8].copy_from_slice(&huge.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, WeightsError::HeaderPastEnd { .. }), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&huge.to_string()), "{msg}");
    }

    #[test]
    fn garbage_header_is_a_format_error() {
        let cfg = tiny(true);
        let t = TempDir::new("garbage");
        let path = t.0.join(SINGLE_FILE);
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"nope");
        std::fs::write(&path, &bytes).unwrap();
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        assert!(matches!(e, WeightsError::Format { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    /// Split `ts` into two shards at `at` and write them with an index.
    fn write_sharded(dir: &Path, ts: &[T], at: usize, write_second: bool) -> [String; 2] {
        let names = [
            "model-00001-of-00002.safetensors".to_string(),
            "model-00002-of-00002.safetensors".to_string(),
        ];
        let (a, b) = ts.split_at(at);
        write(&dir.join(&names[0]), a);
        if write_second {
            write(&dir.join(&names[1]), b);
        }
        let mut map = serde_json::Map::new();
        for (part, shard) in [(a, &names[0]), (b, &names[1])] {
            for t in part {
                map.insert(t.0.clone(), shard.clone().into());
            }
        }
        let total: usize = ts.iter().map(|t| t.3.len()).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        names
    }

    #[test]
    fn sharded_checkpoint_opens() {
        let cfg = tiny(false);
        let ts = full(&cfg, Dtype::BF16);
        let t = TempDir::new("sharded");
        write_sharded(&t.0, &ts, 13, true);
        let ck = Checkpoint::open(&t.0, &cfg).unwrap();
        assert_eq!(ck.files().len(), 2);
        assert_eq!(ck.names().len(), ts.len());
        for (name, _, _, bytes) in &ts {
            assert_eq!(ck.tensor_bytes(name).unwrap(), bytes.as_slice(), "{name}");
        }
    }

    #[test]
    fn sharded_index_with_a_missing_shard_names_it() {
        let cfg = tiny(true);
        let ts = full(&cfg, Dtype::BF16);
        let t = TempDir::new("missingshard");
        let names = write_sharded(&t.0, &ts, 10, false);
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, WeightsError::MissingShard { count: 16, .. }),
            "{msg}"
        );
        assert!(msg.contains(&names[1]) && msg.contains(INDEX_FILE), "{msg}");
    }

    #[test]
    fn index_pointing_at_the_wrong_shard_is_caught() {
        let cfg = tiny(true);
        let ts = full(&cfg, Dtype::BF16);
        let t = TempDir::new("wrongshard");
        let names = write_sharded(&t.0, &ts, 10, true);
        let index = t.0.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["weight_map"]["model.norm.weight"] = names[0].clone().into();
        std::fs::write(&index, json.to_string()).unwrap();
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, WeightsError::IndexMismatch { .. }), "{msg}");
        assert!(
            msg.contains("model.norm.weight") && msg.contains(&names[0]),
            "{msg}"
        );
    }

    #[test]
    fn a_tensor_in_two_shards_is_caught() {
        let cfg = tiny(true);
        let mut ts = full(&cfg, Dtype::BF16);
        let t = TempDir::new("dup");
        let dup = ts[0].clone();
        ts.push(dup);
        write_sharded(&t.0, &ts, 10, true);
        let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
        assert!(matches!(e, WeightsError::Duplicate { .. }), "{e}");
        assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
    }

    #[test]
    fn broken_indexes_are_named() {
        let cfg = tiny(true);
        let t = TempDir::new("badindex");
        let index = t.0.join(INDEX_FILE);
        for (text, want) in [
            ("{ nope", "not valid JSON"),
            (r#"{"metadata": {}}"#, "weight_map"),
            (
                r#"{"weight_map": {"model.norm.weight": 3}}"#,
                "model.norm.weight",
            ),
            (
                r#"{"weight_map": {"model.norm.weight": "../x.safetensors"}}"#,
                "../x.safetensors",
            ),
        ] {
            std::fs::write(&index, text).unwrap();
            let e = Checkpoint::open(&t.0, &cfg).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, WeightsError::Index { .. }), "{msg}");
            assert!(
                msg.contains(INDEX_FILE) && msg.contains(want),
                "{want}: {msg}"
            );
        }
    }

    #[test]
    fn a_directory_without_weights_is_named() {
        let t = TempDir::new("empty");
        let e = Checkpoint::open(&t.0, &tiny(true)).unwrap_err();
        assert!(matches!(e, WeightsError::NoWeights { .. }), "{e}");
        assert!(e.to_string().contains(&t.0.display().to_string()), "{e}");
    }
}
