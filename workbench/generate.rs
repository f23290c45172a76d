//! `workbench generate`: text in, text out for a Hugging Face Qwen2
//! checkpoint, streamed to the terminal as it is sampled.
//!
//! What a checkpoint directory contributes, and how each is read:
//! - `tokenizer.json` (required): the `tokenizers` crate, as
//!   `PreTrainedTokenizerFast` uses it (truncation and padding switched off);
//! - the chat template: `chat_template.jinja` if present (newer transformers
//!   versions save it beside the config), else `tokenizer_config.json`'s
//!   `chat_template` (a string, or a list of `{name, template}` of which
//!   `default` is used), rendered with minijinja the way
//!   `apply_chat_template` renders it with jinja2 (`trim_blocks`,
//!   `lstrip_blocks`, loop controls, `raise_exception`, Python string methods
//!   such as `.strip()`), then encoded without adding special tokens (the
//!   template already holds them);
//! - `tokenizer_config.json`'s `eos_token` and `bos_token` (strings or
//!   `{content: ...}` objects);
//! - `generation_config.json`: `eos_token_id` (an int or a list), and the
//!   sampling defaults `do_sample`, `temperature`, `top_p`, `top_k`.
//!
//! Generation stops at any of the EOS ids: the union of generation_config's
//! `eos_token_id`, tokenizer_config's `eos_token` and config.json's
//! `eos_token_id` (Qwen2-Instruct stops at both `<|im_end|>` and
//! `<|endoftext|>`).
//!
//! Streaming ([`StreamDecoder`]): each step's new ids are appended to the
//! completion, the whole completion is decoded (special tokens skipped) and
//! only the text beyond what was already printed is emitted, as HF's
//! `TextStreamer` does. While the text ends in U+FFFD (a UTF-8 character
//! split across tokens, which byte-level BPE does for most non-ASCII text)
//! it is held back until the next token completes it.

use crate::engine::config::Qwen2Config;
use crate::engine::model::{WeightSource, BLOCK_SIZE};
use crate::engine::runner::{Engine, EngineConfig, EngineError};
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{FinishReason, Request, RequestError, Scheduler, SchedulerConfig};
use cudarc::cublas::{CudaBlas, Gemm};
use kernels::{Gpu, KernelError, Storage};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thiserror::Error;
use tokenizers::Tokenizer;

pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_JSON: &str = "generation_config.json";
pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";

/// What can go wrong before or while generating; each says how to fix it.
#[derive(Debug, Error)]
pub enum GenerateError {
    #[error(
        "--model {name} is a preset: random weights and no tokenizer, so there is no text to \
         generate. Pass a checkpoint directory holding config.json, the *.safetensors files and \
         tokenizer.json, or a hub id in the local Hugging Face cache (e.g. \
         Qwen/Qwen2-0.5B-Instruct)"
    )]
    Preset { name: String },
    #[error(
        "no tokenizer.json in {}: `workbench generate` needs the checkpoint's tokenizer. Pass a \
         checkpoint directory holding config.json, the *.safetensors files and tokenizer.json, \
         or a hub id in the local Hugging Face cache (e.g. Qwen/Qwen2-0.5B-Instruct); presets \
         such as qwen2-0.5b have random weights and no tokenizer",
        dir.display()
    )]
    NoTokenizer { dir: PathBuf },
    // Causes are part of each message (not `#[source]`), so the CLI's
    // `{:#}` does not print them twice.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: not valid JSON ({error}); re-download the checkpoint", path.display())]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{}: `{field}` {what}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        what: String,
    },
    #[error("{}: not a tokenizer the `tokenizers` crate can load: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error(
        "{} has no chat template (no chat_template.jinja and no `chat_template` in \
         tokenizer_config.json), as base models often do; pass --raw to send the prompt text \
         as is",
        dir.display()
    )]
    NoChatTemplate { dir: PathBuf },
    #[error(
        "the chat template ({}) failed: {message}; pass --raw to send the prompt text as is",
        source_path.display()
    )]
    Template {
        source_path: PathBuf,
        message: String,
    },
    #[error("tokenizer: cannot {what}: {message}")]
    Tokenize { what: &'static str, message: String },
    #[error("the prompt is empty: pass it as the PROMPT argument or on stdin")]
    EmptyPrompt,
    #[error("the prompt on stdin is not UTF-8 text ({0})")]
    StdinNotUtf8(std::string::FromUtf8Error),
    #[error("--system applies to chat mode only; drop --raw, or put the text in the prompt")]
    SystemWithRaw,
    #[error("{flag} {value}: {what}")]
    Flag {
        flag: &'static str,
        value: String,
        what: String,
    },
    #[error("{error}; {hint}")]
    Request { error: RequestError, hint: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

fn field_err(path: &Path, field: &str, what: impl Into<String>) -> GenerateError {
    GenerateError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        what: what.into(),
    }
}

/// `generation_config.json`'s sampling defaults and EOS ids (HF's
/// `GenerationConfig`; keys it does not hold are `None`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    /// Not applied by the engine; [`ChatTokenizer::notes`] says so.
    pub repetition_penalty: Option<f32>,
    pub eos_token_id: Vec<u32>,
}

impl GenerationDefaults {
    /// Parse `generation_config.json`'s text; `path` names it in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, GenerateError> {
        let doc = parse_object(text, path)?;
        let number = |key: &str| -> Result<Option<f64>, GenerateError> {
            match doc.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| field_err(path, key, format!("must be a number, got {v}"))),
            }
        };
        let do_sample = match doc.get("do_sample") {
            None | Some(Json::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                field_err(path, "do_sample", format!("must be true or false, got {v}"))
            })?,
        };
        let top_k = match doc.get("top_k") {
            None | Some(Json::Null) => None,
            Some(v) => Some(v.as_u64().map(|k| k as usize).ok_or_else(|| {
                field_err(path, "top_k", format!("must be an integer >= 0, got {v}"))
            })?),
        };
        Ok(Self {
            do_sample,
            temperature: number("temperature")?.map(|x| x as f32),
            top_p: number("top_p")?.map(|x| x as f32),
            top_k,
            repetition_penalty: number("repetition_penalty")?.map(|x| x as f32),
            eos_token_id: parse_eos_token_id(doc.get("eos_token_id"), path)?,
        })
    }
}

fn parse_object(text: &str, path: &Path) -> Result<serde_json::Map<String, Json>, GenerateError> {
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(other) => Err(GenerateError::Field {
            path: path.to_path_buf(),
            field: "(top level)".into(),
            what: format!("must be a JSON object, got {}", json_kind(&other)),
        }),
        Err(error) => Err(GenerateError::Json {
            path: path.to_path_buf(),
            error,
        }),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// `eos_token_id`: absent/null, one id, or a list of ids (HF allows all three).
pub fn parse_eos_token_id(v: Option<&Json>, path: &Path) -> Result<Vec<u32>, GenerateError> {
    let id = |x: &Json| x.as_u64().and_then(|i| u32::try_from(i).ok());
    let bad = |v: &Json| {
        field_err(
            path,
            "eos_token_id",
            format!("must be a token id or a list of token ids, got {v}"),
        )
    };
    match v {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(xs)) => xs.iter().map(|x| id(x).ok_or_else(|| bad(x))).collect(),
        Some(x) => Ok(vec![id(x).ok_or_else(|| bad(x))?]),
    }
}

/// A special-token entry of tokenizer_config.json: a string, an AddedToken
/// object `{"content": ..., ...}`, or null.
fn special_token(
    doc: &serde_json::Map<String, Json>,
    key: &str,
    path: &Path,
) -> Result<Option<String>, GenerateError> {
    match doc.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(field_err(
                path,
                key,
                "is an object without a string `content`",
            )),
        },
        Some(v) => Err(field_err(
            path,
            key,
            format!(
                "must be a string or {{\"content\": ...}}, got {}",
                json_kind(v)
            ),
        )),
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of
/// `{name, template}` (some repos ship several; `default` is the chat one).
fn chat_template_field(
    doc: &serde_json::Map<String, Json>,
    path: &Path,
) -> Result<Option<String>, GenerateError> {
    match doc.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(field_err(
                            path,
                            "chat_template",
                            "is a list whose entries must be {\"name\": ..., \"template\": ...}",
                        ))
                    }
                }
            }
            Err(field_err(
                path,
                "chat_template",
                format!(
                    "lists templates {names:?} but none named `default`; pass --raw and write \
                     the prompt in the model's format"
                ),
            ))
        }
        Some(v) => Err(field_err(
            path,
            "chat_template",
            format!(
                "must be a string or a list of templates, got {}",
                json_kind(v)
            ),
        )),
    }
}

/// The contents of a checkpoint's tokenizer files (`None`: the file is absent).
pub struct TokenizerFiles<'a> {
    /// Where they came from, for error messages.
    pub dir: &'a Path,
    pub tokenizer_json: &'a [u8],
    pub tokenizer_config: Option<&'a str>,
    pub generation_config: Option<&'a str>,
    pub chat_template_jinja: Option<&'a str>,
}

/// How the prompt text becomes token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptMode {
    /// Through the chat template: an optional system message, then the user
    /// message, then the assistant's turn opened.
    Chat { system: Option<String> },
    /// The text encoded as is (with the tokenizer's own special tokens, as
    /// `tokenizer(text)` does; Qwen2's adds none).
    Raw,
}

/// A checkpoint's tokenizer, chat template, EOS ids and sampling defaults.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    /// The template and the file it came from.
    chat_template: Option<(String, PathBuf)>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// generation_config's `eos_token_id` ∪ tokenizer_config's `eos_token`.
    eos_ids: Vec<u32>,
    pub generation: GenerationDefaults,
}

impl ChatTokenizer {
    /// Read the tokenizer files of the checkpoint directory `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, GenerateError> {
        let tok_path = dir.join(TOKENIZER_JSON);
        if !tok_path.is_file() {
            return Err(GenerateError::NoTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>, GenerateError> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            std::fs::read(&path)
                .map(Some)
                .map_err(|error| GenerateError::Read { path, error })
        };
        let text = |name: &str| -> Result<Option<String>, GenerateError> {
            read(name)?
                .map(|b| {
                    String::from_utf8(b)
                        .map_err(|_| field_err(&dir.join(name), "(file)", "is not UTF-8 text"))
                })
                .transpose()
        };
        let tokenizer_json = read(TOKENIZER_JSON)?.unwrap_or_default();
        let (tc, gc, jinja) = (
            text(TOKENIZER_CONFIG_JSON)?,
            text(GENERATION_CONFIG_JSON)?,
            text(CHAT_TEMPLATE_JINJA)?,
        );
        Self::from_files(&TokenizerFiles {
            dir,
            tokenizer_json: &tokenizer_json,
            tokenizer_config: tc.as_deref(),
            generation_config: gc.as_deref(),
            chat_template_jinja: jinja.as_deref(),
        })
    }

    /// Build from file contents (tests pass embedded files).
    pub fn from_files(f: &TokenizerFiles<'_>) -> Result<Self, GenerateError> {
        let tok_path = f.dir.join(TOKENIZER_JSON);
        let mut tokenizer =
            Tokenizer::from_bytes(f.tokenizer_json).map_err(|e| GenerateError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        // Some repos save a truncation or padding setting in tokenizer.json;
        // a prompt must never be cut silently.
        tokenizer
            .with_truncation(None)
            .map_err(|e| GenerateError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);

        let tc_path = f.dir.join(TOKENIZER_CONFIG_JSON);
        let (mut chat_template, bos_token, eos_token) = match f.tokenizer_config {
            None => (None, None, None),
            Some(text) => {
                let doc = parse_object(text, &tc_path)?;
                (
                    chat_template_field(&doc, &tc_path)?.map(|t| (t, tc_path.clone())),
                    special_token(&doc, "bos_token", &tc_path)?,
                    special_token(&doc, "eos_token", &tc_path)?,
                )
            }
        };
        if let Some(t) = f.chat_template_jinja {
            chat_template = Some((t.to_string(), f.dir.join(CHAT_TEMPLATE_JINJA)));
        }
        let generation = match f.generation_config {
            None => GenerationDefaults::default(),
            Some(text) => {
                GenerationDefaults::from_json_str(text, &f.dir.join(GENERATION_CONFIG_JSON))?
            }
        };
        let mut eos_ids = generation.eos_token_id.clone();
        if let Some(name) = &eos_token {
            let id = tokenizer.token_to_id(name).ok_or_else(|| {
                field_err(
                    &tc_path,
                    "eos_token",
                    format!(
                        "is {name:?}, which is not a token of tokenizer.json; the tokenizer \
                         files come from different checkpoints (re-download them)"
                    ),
                )
            })?;
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            tokenizer,
            dir: f.dir.to_path_buf(),
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
            generation,
        })
    }

    /// generation_config's `eos_token_id` ∪ tokenizer_config's `eos_token`,
    /// sorted.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// [`Self::eos_ids`] ∪ `model_eos` (config.json's `eos_token_id`).
    pub fn eos_ids_with(&self, model_eos: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_ids.iter().chain(model_eos).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, GenerateError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| GenerateError::Tokenize {
                what: "encode the prompt",
                message: e.to_string(),
            })
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, GenerateError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| GenerateError::Tokenize {
                what: "decode the output",
                message: e.to_string(),
            })
    }

    /// The chat template rendered for `[system?, user]` with the assistant's
    /// turn opened (`add_generation_prompt=true`).
    pub fn render_chat(&self, system: Option<&str>, user: &str) -> Result<String, GenerateError> {
        let Some((template, path)) = &self.chat_template else {
            return Err(GenerateError::NoChatTemplate {
                dir: self.dir.clone(),
            });
        };
        let fail = |e: minijinja::Error| GenerateError::Template {
            source_path: path.clone(),
            message: template_error(&e),
        };
        let mut env = Environment::new();
        // jinja2 as transformers configures it for chat templates.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(fail)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {msg}"),
            ))
        });
        let tmpl = env.template_from_str(template).map_err(fail)?;
        let message = |role: &str, content: &str| {
            Value::from(BTreeMap::from([
                ("role".to_string(), Value::from(role)),
                ("content".to_string(), Value::from(content)),
            ]))
        };
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(message("system", s));
        }
        messages.push(message("user", user));
        let mut ctx = BTreeMap::from([
            ("messages".to_string(), Value::from(messages)),
            ("add_generation_prompt".to_string(), Value::from(true)),
        ]);
        // Absent tokens stay undefined (render as ""), as in transformers.
        for (key, tok) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(t) = tok {
                ctx.insert(key.to_string(), Value::from(t.as_str()));
            }
        }
        tmpl.render(Value::from(ctx)).map_err(fail)
    }

    /// The prompt's token ids in `mode`.
    pub fn prompt_ids(&self, text: &str, mode: &PromptMode) -> Result<Vec<u32>, GenerateError> {
        if text.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let ids = match mode {
            PromptMode::Raw => self.encode(text, true)?,
            PromptMode::Chat { system } => {
                let rendered = self.render_chat(system.as_deref(), text)?;
                self.encode(&rendered, false)?
            }
        };
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Settings of the checkpoint the engine does not apply.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(p) = self.generation.repetition_penalty.filter(|&p| p != 1.0) {
            notes.push(format!(
                "generation_config.json sets repetition_penalty {p}; the engine does not apply it"
            ));
        }
        notes
    }
}

/// A minijinja error with its cause chain (the line it happened on).
fn template_error(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Turns generated ids into the text to print, a piece at a time.
pub struct StreamDecoder<'t> {
    tok: &'t ChatTokenizer,
    ids: Vec<u32>,
    printed: String,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t ChatTokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            printed: String::new(),
        }
    }

    /// Append `ids`; the newly completed text (possibly empty).
    pub fn push(&mut self, ids: &[u32]) -> Result<String, GenerateError> {
        self.ids.extend_from_slice(ids);
        let text = self.tok.decode(&self.ids, true)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD; the next token may
        // complete it into another character, so wait.
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.emit(text))
    }

    /// Whatever is still held back (a dangling partial character is
    /// printed as U+FFFD, as the full decode shows it).
    pub fn finish(&mut self) -> Result<String, GenerateError> {
        let text = self.tok.decode(&self.ids, true)?;
        Ok(self.emit(text))
    }

    /// All the text printed so far.
    pub fn printed(&self) -> &str {
        &self.printed
    }

    fn emit(&mut self, text: String) -> String {
        // Decoding more ids only appends for byte-level BPE; should a decoder
        // ever rewrite earlier text, print from where the two differ.
        let start = if text.starts_with(&self.printed) {
            self.printed.len()
        } else {
            text.char_indices()
                .zip(self.printed.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(self.printed.len().min(text.len()))
        };
        let new = text.get(start..).unwrap_or("").to_string();
        self.printed = text;
        new
    }
}

/// The sampling flags as given (`None`: not given).
#[derive(Clone, Debug, Default)]
pub struct SamplingArgs {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_tokens: usize,
    pub seed: u64,
    pub ignore_eos: bool,
}

/// The flags over the checkpoint's defaults: when generation_config.json
/// has `do_sample: true`, unset flags take its values, then transformers'
/// own defaults (temperature 1, top-p 1, top-k 50), as `generate()` would;
/// otherwise unset flags mean greedy.
pub fn sampling_params(
    args: &SamplingArgs,
    gen: &GenerationDefaults,
) -> Result<SamplingParams, GenerateError> {
    let flag = |flag: &'static str, value: String, what: &str| GenerateError::Flag {
        flag,
        value,
        what: what.to_string(),
    };
    if let Some(t) = args.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            return Err(flag(
                "--temperature",
                t.to_string(),
                "must be >= 0 (0 = greedy)",
            ));
        }
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(flag(
                "--top-p",
                p.to_string(),
                "must be in (0, 1] (1 = off)",
            ));
        }
    }
    if args.max_tokens == 0 {
        return Err(flag("--max-tokens", "0".into(), "must be at least 1"));
    }
    let (temperature, top_p, top_k) = if gen.do_sample {
        (
            args.temperature.or(gen.temperature).unwrap_or(1.0),
            args.top_p.or(gen.top_p).unwrap_or(1.0),
            args.top_k.or(gen.top_k).unwrap_or(50),
        )
    } else {
        (
            args.temperature.unwrap_or(0.0),
            args.top_p.unwrap_or(1.0),
            args.top_k.unwrap_or(0),
        )
    };
    let params = if temperature == 0.0 {
        // Greedy: top-k/top-p change nothing, and without them the engine
        // keeps sampling on the GPU.
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            seed: Some(args.seed),
            ignore_eos: args.ignore_eos,
            max_tokens: args.max_tokens,
        }
    } else {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(args.seed),
            ignore_eos: args.ignore_eos,
            max_tokens: args.max_tokens,
        }
    };
    // The flags were checked above, so a bad value came from the file.
    params.validate().map_err(|e| {
        field_err(
            Path::new(GENERATION_CONFIG_JSON),
            e.field(),
            format!(
                "is out of range ({e}); override it with --{}",
                e.field().replace('_', "-")
            ),
        )
    })?;
    Ok(params)
}

/// One sequence at a time; `--max-model-len` capped at the model's
/// `max_position_embeddings`. The KV pool is sized from free memory at
/// `gpu_memory_utilization`, as for `e2e`.
pub fn engine_config(
    cfg: &Qwen2Config,
    max_model_len: usize,
    gpu_memory_utilization: f64,
    cuda_graphs: bool,
) -> Result<EngineConfig, GenerateError> {
    if !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0) {
        return Err(GenerateError::Flag {
            flag: "--gpu-memory-utilization",
            value: gpu_memory_utilization.to_string(),
            what: "must be in (0, 1]".into(),
        });
    }
    if max_model_len < 2 {
        return Err(GenerateError::Flag {
            flag: "--max-model-len",
            value: max_model_len.to_string(),
            what: "must be at least 2 (one prompt token and one generated)".into(),
        });
    }
    let max_model_len = max_model_len.min(cfg.max_position_embeddings);
    Ok(EngineConfig {
        max_num_seqs: 1,
        max_batched_tokens: max_model_len,
        max_model_len,
        gpu_memory_utilization,
        num_blocks: None,
        cuda_graphs,
        decode_split_tokens: 0,
        fused_decode_qkv: true,
        decode_attention: kernels::paged_attention::PRODUCTION,
        prefill_attention: kernels::prefill_attention::PRODUCTION,
        gemm: Default::default(),
        pdl: false,
        split_k: crate::engine::runner::DEFAULT_SPLIT_K,
    })
}

/// The engine's own admission checks (vocab, lengths, sampling), run before
/// any GPU work, with the flag to change.
pub fn validate_request(
    cfg: &Qwen2Config,
    ec: &EngineConfig,
    req: &Request,
) -> Result<(), GenerateError> {
    let sched = Scheduler::new(SchedulerConfig {
        max_num_seqs: ec.max_num_seqs,
        max_batched_tokens: ec.max_batched_tokens,
        max_model_len: ec.max_model_len,
        vocab_size: cfg.vocab_size,
        // The real pool is sized on the GPU; Engine::new guarantees room
        // for one max_model_len sequence, which is all this needs.
        num_blocks: ec.max_model_len.div_ceil(BLOCK_SIZE),
        block_size: BLOCK_SIZE,
    })
    .map_err(EngineError::from)?;
    sched.validate(req).map_err(|error| {
        let hint = match error {
            RequestError::TooLong { .. } if ec.max_model_len < cfg.max_position_embeddings => {
                format!(
                    "lower --max-tokens, shorten the prompt, or raise --max-model-len (the \
                     model allows up to {})",
                    cfg.max_position_embeddings
                )
            }
            RequestError::TooLong { .. } => format!(
                "lower --max-tokens or shorten the prompt ({} tokens is the model's \
                 max_position_embeddings)",
                cfg.max_position_embeddings
            ),
            RequestError::PromptTokenOutOfVocab { .. } | RequestError::EosOutOfVocab { .. } => {
                "tokenizer.json and config.json come from different checkpoints".into()
            }
            _ => "check the sampling flags".into(),
        };
        GenerateError::Request { error, hint }
    })
}

/// What one generation took.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: FinishReason,
    /// From queueing the request to its first token on the host.
    pub ttft_s: f64,
    /// Tokens after the first, per second after the first; `None` for one token.
    pub decode_tok_per_s: Option<f64>,
    pub total_s: f64,
}

impl GenerateStats {
    /// The stats line printed on stderr.
    pub fn line(&self) -> String {
        let reason = match self.finish_reason {
            FinishReason::Eos => "eos",
            FinishReason::MaxTokens => "max_tokens",
            FinishReason::Aborted => "aborted",
            FinishReason::KvPoolExhausted => "kv_pool_exhausted",
        };
        let tps = self
            .decode_tok_per_s
            .map_or("n/a".to_string(), |t| format!("{t:.1}"));
        format!(
            "{} prompt tokens, {} generated tokens, finish {reason}, TTFT {:.1} ms, decode {tps} \
             tok/s",
            self.prompt_tokens,
            self.generated_tokens,
            self.ttft_s * 1e3
        )
    }
}

/// Run `req` alone on a fresh engine, handing each step's new token ids to
/// `on_tokens` (a final EOS id is not handed over). A short warm-up request
/// first compiles the kernels and captures the decode graph, so TTFT is the
/// model's and not NVRTC's. An error from `on_tokens` stops generation.
pub fn run_generate_ids<T: Storage>(
    gpu: &Gpu,
    cfg: &Qwen2Config,
    src: WeightSource<'_>,
    ec: EngineConfig,
    req: Request,
    mut on_tokens: impl FnMut(&[u32]) -> Result<(), GenerateError>,
) -> Result<GenerateStats, GenerateError>
where
    CudaBlas: Gemm<T>,
{
    if req.prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let mut engine = Engine::<T>::new(gpu, cfg, src, ec)?;
    let request_error = |error| GenerateError::Request {
        error,
        hint: "lower --max-model-len or --max-tokens, or raise --gpu-memory-utilization".into(),
    };
    // Warm-up: up to 16 prompt tokens, 2 generated (prefill and one decode).
    let warm_len = req
        .prompt
        .len()
        .min(16)
        .min(ec.max_model_len.saturating_sub(1))
        .max(1);
    let warm = Request {
        id: u64::MAX,
        prompt: req.prompt[..warm_len].to_vec(),
        params: SamplingParams {
            max_tokens: 2.min(ec.max_model_len.saturating_sub(warm_len)).max(1),
            ignore_eos: true,
            seed: Some(0),
            ..SamplingParams::greedy()
        },
        eos: Vec::new(),
    };
    engine.add(warm).map_err(request_error)?;
    while !engine.is_finished() {
        engine.step(gpu)?;
    }
    engine.take_finished();
    gpu.synchronize()?;

    let prompt_tokens = req.prompt.len();
    engine.reset_clock();
    let t0 = Instant::now();
    let id = engine.add(req).map_err(request_error)?;
    let (mut sent, mut first_s, mut last_s) = (0usize, None, 0.0);
    let mut finish = None;
    while finish.is_none() {
        engine.step(gpu)?;
        let done = engine.take_finished();
        let seq = match done.iter().find(|f| f.seq.id == id) {
            Some(f) => &f.seq,
            None => engine.sched.sequence(id).ok_or_else(|| {
                EngineError::Schedule(crate::engine::scheduler::ScheduleError::Inconsistent(
                    format!("{id} is neither running nor finished"),
                ))
            })?,
        };
        let completion = seq.completion();
        finish = seq.finish_reason();
        if completion.len() > sent {
            let now = t0.elapsed().as_secs_f64();
            first_s.get_or_insert(now);
            last_s = now;
            let mut end = completion.len();
            if finish == Some(FinishReason::Eos) {
                end -= 1;
            }
            let new = completion[sent..end].to_vec();
            sent = completion.len();
            if !new.is_empty() {
                on_tokens(&new)?;
            }
        }
        if engine.is_finished() && finish.is_none() {
            finish = Some(FinishReason::Aborted);
        }
    }
    let total_s = t0.elapsed().as_secs_f64();
    let first = first_s.unwrap_or(total_s);
    Ok(GenerateStats {
        prompt_tokens,
        generated_tokens: sent,
        finish_reason: finish.unwrap_or(FinishReason::Aborted),
        ttft_s: first,
        decode_tok_per_s: (sent > 1 && last_s > first)
            .then(|| (sent - 1) as f64 / (last_s - first)),
        total_s,
    })
}

/// [`run_generate_ids`] with the ids detokenized: `on_text` gets each newly
/// completed piece of text as it arrives; an error from it (a closed
/// stdout) stops generation.
pub fn run_generate<T: Storage>(
    gpu: &Gpu,
    cfg: &Qwen2Config,
    src: WeightSource<'_>,
    ec: EngineConfig,
    tok: &ChatTokenizer,
    req: Request,
    mut on_text: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<GenerateStats, GenerateError>
where
    CudaBlas: Gemm<T>,
{
    let mut stream = StreamDecoder::new(tok);
    let stats = run_generate_ids::<T>(gpu, cfg, src, ec, req, |ids| {
        let piece = stream.push(ids)?;
        if !piece.is_empty() {
            on_text(&piece).map_err(GenerateError::Output)?;
        }
        Ok(())
    })?;
    let rest = stream.finish()?;
    if !rest.is_empty() {
        on_text(&rest).map_err(GenerateError::Output)?;
    }
    Ok(stats)
}

/// The prompt: the argument if given, else all of stdin (one trailing
/// newline dropped, as `echo` adds it). Empty is an error.
pub fn read_prompt(
    arg: Option<String>,
    stdin: &mut dyn std::io::Read,
) -> Result<String, GenerateError> {
    let text = match arg {
        Some(t) => t,
        None => {
            let mut buf = Vec::new();
            stdin
                .read_to_end(&mut buf)
                .map_err(|error| GenerateError::Read {
                    path: PathBuf::from("<stdin>"),
                    error,
                })?;
            let mut s = String::from_utf8(buf).map_err(GenerateError::StdinNotUtf8)?;
            if s.ends_with('\n') {
                s.pop();
                if s.ends_with('\r') {
                    s.pop();
                }
            }
            s
        }
    };
    if text.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY_TOKENIZER: &[u8] = include_bytes!("../tests/golden/qwen2-tiny/tokenizer.json");
    const TINY_CONFIG: &str = include_str!("../tests/golden/qwen2-tiny/tokenizer_config.json");

    fn tiny_with(generation_config: Option<&str>) -> ChatTokenizer {
        ChatTokenizer::from_files(&TokenizerFiles {
            dir: Path::new("tiny"),
            tokenizer_json: TINY_TOKENIZER,
            tokenizer_config: Some(TINY_CONFIG),
            generation_config,
            chat_template_jinja: None,
        })
        .expect("the tiny tokenizer loads")
    }

    fn tiny() -> ChatTokenizer {
        tiny_with(None)
    }

    #[test]
    fn tiny_tokenizer_is_one_id_per_byte() {
        let t = tiny();
        let text = "héllo €";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        assert_eq!(t.token_to_id("<|im_end|>"), Some(255));
        assert_eq!(t.eos_ids(), &[255]);
    }

    #[test]
    fn stream_holds_back_a_character_split_over_tokens() {
        let t = tiny();
        let mut s = StreamDecoder::new(&t);
        // "a€b": € is E2 82 AC, three tokens.
        assert_eq!(s.push(&[b'a' as u32]).unwrap(), "a");
        assert_eq!(s.push(&[0xE2]).unwrap(), "");
        assert_eq!(s.push(&[0x82]).unwrap(), "");
        assert_eq!(s.push(&[0xAC]).unwrap(), "€");
        // Special tokens are skipped; several ids at once are fine.
        assert_eq!(s.push(&[255, b'b' as u32, 0xC3]).unwrap(), "");
        assert_eq!(s.push(&[0xA9]).unwrap(), "bé");
        assert_eq!(s.finish().unwrap(), "");
        assert_eq!(s.printed(), "a€bé");
    }

    #[test]
    fn stream_pieces_add_up_to_the_full_decode() {
        let t = tiny();
        // The golden's greedy continuation of prompt [7]: lone continuation
        // bytes (invalid UTF-8) and a split two-byte character.
        let ids = [191u32, 85, 92, 177, 11, 194, 135, 39];
        let mut s = StreamDecoder::new(&t);
        let mut out = String::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let p = s.push(&[id]).unwrap();
            pieces.push(p.clone());
            out.push_str(&p);
        }
        out.push_str(&s.finish().unwrap());
        assert_eq!(out, t.decode(&ids, true).unwrap());
        assert_eq!(out, "\u{FFFD}U\\\u{FFFD}\u{b}\u{87}'");
        assert_eq!(pieces[0], "", "a lone 0xBF is held until the next token");
        assert_eq!(pieces[5], "", "0xC2 waits for its continuation byte");
        assert_eq!(pieces[6], "\u{87}");
        // A dangling lead byte at the end is flushed as U+FFFD.
        let mut s = StreamDecoder::new(&t);
        assert_eq!(s.push(&[b'x' as u32, 0xE2]).unwrap(), "");
        assert_eq!(s.finish().unwrap(), "x\u{FFFD}");
    }

    #[test]
    fn chat_template_renders_chatml_with_the_default_system_prompt() {
        let t = tiny();
        assert_eq!(
            t.render_chat(None, "hi").unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render_chat(Some("Be brief."), "hi").unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = t
            .prompt_ids("hi", &PromptMode::Chat { system: None })
            .unwrap();
        assert_eq!(ids[0], 254, "<|im_start|> is one special id");
        assert_eq!(ids.iter().filter(|&&i| i == 254).count(), 3);
        assert_eq!(ids.iter().filter(|&&i| i == 255).count(), 2);
        assert_eq!(
            &ids[ids.len() - 10..],
            &t.encode("assistant\n", false).unwrap()[..]
        );
        assert_eq!(
            t.prompt_ids("hi", &PromptMode::Raw).unwrap(),
            vec![b'h' as u32, b'i' as u32]
        );
    }

    #[test]
    fn templates_get_jinja2_whitespace_pycompat_and_raise_exception() {
        let files = |template: &str| {
            let tc = serde_json::json!({ "chat_template": template, "eos_token": {"content": "<|im_end|>"}, "bos_token": "<|endoftext|>" }).to_string();
            ChatTokenizer::from_files(&TokenizerFiles {
                dir: Path::new("t"),
                tokenizer_json: TINY_TOKENIZER,
                tokenizer_config: Some(&tc),
                generation_config: None,
                chat_template_jinja: None,
            })
            .unwrap()
        };
        // trim_blocks / lstrip_blocks as jinja2 has them (checked with jinja2
        // 3.1: the newline after `{{ }}` stays), `.strip()`, bos_token.
        let t = files(
            "{{ bos_token }}\n  {% for m in messages %}\n{{ m['content'].strip() }}|{% endfor %}\n{{ eos_token }}",
        );
        assert_eq!(
            t.render_chat(None, "  hi  ").unwrap(),
            "<|endoftext|>\nhi|<|im_end|>"
        );
        assert_eq!(
            t.eos_ids(),
            &[255],
            "eos_token given as an AddedToken object"
        );
        let t = files("{% if messages[0]['role'] != 'system' %}{{ raise_exception('System role required') }}{% endif %}");
        let e = t.render_chat(None, "hi").unwrap_err().to_string();
        assert!(
            e.contains("System role required") && e.contains("--raw"),
            "{e}"
        );
        assert!(t.render_chat(Some("s"), "hi").is_ok());
        let e = files("{% for %}")
            .render_chat(None, "hi")
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template") && e.contains("--raw"), "{e}");
    }

    #[test]
    fn chat_template_may_be_a_named_list_or_a_jinja_file() {
        let tc = serde_json::json!({ "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ messages[0].content }}"},
        ]})
        .to_string();
        let mut f = TokenizerFiles {
            dir: Path::new("t"),
            tokenizer_json: TINY_TOKENIZER,
            tokenizer_config: Some(&tc),
            generation_config: None,
            chat_template_jinja: None,
        };
        assert_eq!(
            ChatTokenizer::from_files(&f)
                .unwrap()
                .render_chat(None, "x")
                .unwrap(),
            "Dx"
        );
        f.chat_template_jinja = Some("J{{ messages | length }}");
        assert_eq!(
            ChatTokenizer::from_files(&f)
                .unwrap()
                .render_chat(None, "x")
                .unwrap(),
            "J1"
        );
        let tc = serde_json::json!({ "chat_template": [{"name": "tool_use", "template": "T"}] })
            .to_string();
        f.tokenizer_config = Some(&tc);
        f.chat_template_jinja = None;
        let e = ChatTokenizer::from_files(&f).err().unwrap().to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("default"),
            "{e}"
        );
    }

    #[test]
    fn no_chat_template_says_to_pass_raw() {
        let t = ChatTokenizer::from_files(&TokenizerFiles {
            dir: Path::new("base-model"),
            tokenizer_json: TINY_TOKENIZER,
            tokenizer_config: Some("{}"),
            generation_config: None,
            chat_template_jinja: None,
        })
        .unwrap();
        assert!(!t.has_chat_template());
        let e = t
            .prompt_ids("hi", &PromptMode::Chat { system: None })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("base-model") && e.contains("no chat template") && e.contains("--raw"),
            "{e}"
        );
        assert_eq!(t.prompt_ids("hi", &PromptMode::Raw).unwrap().len(), 2);
        assert!(t.eos_ids().is_empty());
    }

    #[test]
    fn eos_ids_parse_from_an_int_or_a_list_and_join_the_eos_token() {
        let p = Path::new("generation_config.json");
        let parse = |s: &str| parse_eos_token_id(serde_json::from_str::<Json>(s).ok().as_ref(), p);
        assert_eq!(parse("7").unwrap(), vec![7]);
        assert_eq!(parse("[151645, 151643]").unwrap(), vec![151645, 151643]);
        assert_eq!(parse("null").unwrap(), Vec::<u32>::new());
        let e = parse("\"<|im_end|>\"").unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("eos_token_id"),
            "{e}"
        );
        assert!(parse("[1, -2]").is_err());

        let t = tiny_with(Some(r#"{"eos_token_id": [253, 255]}"#));
        assert_eq!(t.eos_ids(), &[253, 255]);
        let t = tiny_with(Some(r#"{"eos_token_id": 253}"#));
        assert_eq!(
            t.eos_ids(),
            &[253, 255],
            "union with tokenizer_config's eos_token"
        );
        assert_eq!(t.eos_ids_with(&[7, 255]), vec![7, 253, 255]);
    }

    #[test]
    fn bad_files_name_the_file_and_the_field() {
        let load = |tok: &[u8], tc: Option<&str>, gc: Option<&str>| {
            ChatTokenizer::from_files(&TokenizerFiles {
                dir: Path::new("/ckpt"),
                tokenizer_json: tok,
                tokenizer_config: tc,
                generation_config: gc,
                chat_template_jinja: None,
            })
            .err()
            .expect("an error")
            .to_string()
        };
        let e = load(b"{ not json", None, None);
        assert!(e.contains("/ckpt/tokenizer.json"), "{e}");
        let e = load(TINY_TOKENIZER, Some("[1]"), None);
        assert!(
            e.contains("/ckpt/tokenizer_config.json") && e.contains("JSON object"),
            "{e}"
        );
        let e = load(TINY_TOKENIZER, Some(r#"{"eos_token": "<|nope|>"}"#), None);
        assert!(e.contains("eos_token") && e.contains("<|nope|>"), "{e}");
        let e = load(TINY_TOKENIZER, Some(r#"{"eos_token": 5}"#), None);
        assert!(e.contains("eos_token") && e.contains("a number"), "{e}");
        let e = load(TINY_TOKENIZER, None, Some(r#"{"temperature": "hot"}"#));
        assert!(
            e.contains("/ckpt/generation_config.json") && e.contains("temperature"),
            "{e}"
        );
        let e = load(TINY_TOKENIZER, None, Some(r#"{"top_k": -1}"#));
        assert!(e.contains("top_k"), "{e}");
    }

    #[test]
    fn missing_tokenizer_json_names_the_directory_and_presets() {
        let dir = std::env::temp_dir().join(format!("wb-gen-notok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = ChatTokenizer::from_dir(&dir).err().unwrap().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
        assert!(e.contains("tokenizer.json") && e.contains("presets"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let e = GenerateError::Preset {
            name: "qwen2-0.5b".into(),
        }
        .to_string();
        assert!(
            e.contains("no tokenizer") && e.contains("checkpoint directory"),
            "{e}"
        );
    }

    #[test]
    fn sampling_flags_override_the_checkpoint_defaults() {
        let args = SamplingArgs {
            max_tokens: 16,
            seed: 3,
            ..Default::default()
        };
        // No generation_config: greedy.
        let p = sampling_params(&args, &GenerationDefaults::default()).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.0, 0, 1.0));
        assert_eq!((p.seed, p.max_tokens), (Some(3), 16));
        // Qwen2.5-Instruct's: do_sample with temperature 0.7, top_p 0.8, top_k 20.
        let gen = GenerationDefaults::from_json_str(
            r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "repetition_penalty": 1.05, "eos_token_id": [151645, 151643]}"#,
            Path::new("g"),
        )
        .unwrap();
        let p = sampling_params(&args, &gen).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.7, 20, 0.8));
        let p = sampling_params(
            &SamplingArgs {
                temperature: Some(0.0),
                ..args.clone()
            },
            &gen,
        )
        .unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.0, 0, 1.0), "greedy");
        let p = sampling_params(
            &SamplingArgs {
                top_k: Some(5),
                ..args.clone()
            },
            &gen,
        )
        .unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.7, 5, 0.8));
        // do_sample without values: transformers' defaults.
        let gen = GenerationDefaults {
            do_sample: true,
            ..Default::default()
        };
        let p = sampling_params(&args, &gen).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (1.0, 50, 1.0));
        for (a, flag) in [
            (
                SamplingArgs {
                    temperature: Some(-1.0),
                    ..args.clone()
                },
                "--temperature",
            ),
            (
                SamplingArgs {
                    top_p: Some(0.0),
                    ..args.clone()
                },
                "--top-p",
            ),
            (
                SamplingArgs {
                    max_tokens: 0,
                    ..args.clone()
                },
                "--max-tokens",
            ),
        ] {
            let e = sampling_params(&a, &gen).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
        // A bad value in the file names the file and the flag that overrides it.
        let gen = GenerationDefaults {
            do_sample: true,
            top_p: Some(0.0),
            ..Default::default()
        };
        let e = sampling_params(&args, &gen).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("--top-p"),
            "{e}"
        );
        let p = sampling_params(
            &SamplingArgs {
                top_p: Some(0.9),
                ..args.clone()
            },
            &gen,
        )
        .unwrap();
        assert_eq!(p.top_p, 0.9);
    }

    #[test]
    fn requests_are_checked_against_the_engine_limits_before_the_gpu() {
        let cfg =
            Qwen2Config::from_json_str(include_str!("../tests/golden/qwen2-tiny/config.json"))
                .unwrap();
        let ec = engine_config(&cfg, 4096, 0.9, true).unwrap();
        assert_eq!(ec.max_model_len, 128, "capped at max_position_embeddings");
        assert_eq!(ec.max_batched_tokens, 128);
        let req = |prompt: Vec<u32>, max_tokens| Request {
            id: 0,
            prompt,
            params: SamplingParams {
                max_tokens,
                ..SamplingParams::greedy()
            },
            eos: vec![255],
        };
        assert!(validate_request(&cfg, &ec, &req(vec![7], 127)).is_ok());
        let e = validate_request(&cfg, &ec, &req(vec![7], 128))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-tokens") && e.contains("128"), "{e}");
        let e = validate_request(&cfg, &ec, &req(vec![300], 8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("different checkpoints"), "{e}");
        let e = engine_config(&cfg, 4096, 1.5, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gpu-memory-utilization"), "{e}");
        assert!(engine_config(&cfg, 1, 0.9, true).is_err());
    }

    #[test]
    fn prompts_come_from_the_argument_or_stdin() {
        let mut none: &[u8] = b"";
        assert_eq!(read_prompt(Some("hi".into()), &mut none).unwrap(), "hi");
        let mut stdin: &[u8] = b"hello\n";
        assert_eq!(read_prompt(None, &mut stdin).unwrap(), "hello");
        let mut stdin: &[u8] = b"two\nlines\r\n";
        assert_eq!(read_prompt(None, &mut stdin).unwrap(), "two\nlines");
        let mut stdin: &[u8] = b"\n";
        let e = read_prompt(None, &mut stdin).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert!(read_prompt(Some(String::new()), &mut none).is_err());
        let mut stdin: &[u8] = b"\xff\xfe";
        assert!(read_prompt(None, &mut stdin)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
    }
}
