//! Where a `--model` argument points, found without any network access.
//!
//! Three forms, tried in this order:
//! 1. a preset name (`qwen2-0.5b`, `qwen2-1.5b`, `qwen2-7b`, any case): shapes
//!    only, for timing runs with random weights;
//! 2. an existing directory holding `config.json` (and the safetensors);
//! 3. a hub id `Org/Name`, looked up in the local Hugging Face cache the way
//!    `huggingface_hub` lays it out:
//!    `<cache>/models--Org--Name/refs/main` holds a 40-hex commit, and
//!    `<cache>/models--Org--Name/snapshots/<commit>/` holds the files
//!    (symlinks into `blobs/`).
//!
//! The cache roots searched, in order: `$HF_HUB_CACHE`, `$HF_HOME/hub`,
//! `$XDG_CACHE_HOME/huggingface/hub` (where `huggingface_hub` puts `HF_HOME`
//! by default when XDG is set) and `$HOME/.cache/huggingface/hub`. The
//! environment is read through a function passed in
//! ([`resolve_model_with`]) so tests build fake caches without touching the
//! process environment.
//!
//! A directory named like a preset is reached as `./qwen2-0.5b`.

use super::config::PRESET_NAMES;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A name from [`PRESET_NAMES`], lower-cased.
    Preset(String),
    /// A checkpoint directory given directly; it holds `config.json`.
    Dir(PathBuf),
    /// A snapshot in the local Hugging Face cache; `dir` holds `config.json`.
    HubCache {
        repo_id: String,
        commit: String,
        dir: PathBuf,
    },
}

impl ModelSource {
    /// The directory holding `config.json` and the weights; `None` for a preset.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelSource::Preset(_) => None,
            ModelSource::Dir(dir) | ModelSource::HubCache { dir, .. } => Some(dir),
        }
    }
}

#[derive(Debug, Error)]
pub enum HubError {
    #[error(
        "--model `{arg}` is not a preset ({presets}), not an existing directory, and not a \
         Hugging Face hub id of the form Org/Name (e.g. Qwen/Qwen2-1.5B-Instruct)",
        presets = PRESET_NAMES.join(", ")
    )]
    Unrecognized { arg: String },
    #[error(
        "--model {}: is a file; pass the directory that holds config.json and the \
         *.safetensors files",
        path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "--model {}: the directory has no config.json; pass the checkpoint directory that \
         holds config.json and the *.safetensors files",
        dir.display()
    )]
    DirWithoutConfig { dir: PathBuf },
    #[error(
        "model {repo_id} is not in the local Hugging Face cache (no network is used). {}\n\
         To fix: on a machine with network run `huggingface-cli download {repo_id}`, copy its \
         cache directory here and point HF_HUB_CACHE at it; or pass the checkpoint directory \
         (holding config.json and the *.safetensors files) as --model",
        searched_list(.searched)
    )]
    NotCached {
        repo_id: String,
        searched: Vec<PathBuf>,
    },
    #[error(
        "model {repo_id}: {} does not exist, so the cached repo has no `main` revision \
         (an interrupted download, or one of another revision); re-run \
         `huggingface-cli download {repo_id}`, or pass a snapshot directory as --model",
        ref_file.display()
    )]
    MissingRef { repo_id: String, ref_file: PathBuf },
    #[error(
        "model {repo_id}: {} holds {content:?}, not a 40-hex-digit commit hash; re-run \
         `huggingface-cli download {repo_id}`",
        ref_file.display()
    )]
    BadRef {
        repo_id: String,
        ref_file: PathBuf,
        content: String,
    },
    #[error(
        "model {repo_id}: refs/main names commit {commit}, but its snapshot {} does not \
         exist; re-run `huggingface-cli download {repo_id}`",
        snapshot.display()
    )]
    MissingSnapshot {
        repo_id: String,
        commit: String,
        snapshot: PathBuf,
    },
    #[error(
        "model {repo_id}: snapshot {} has no config.json (a partial download, or a dangling \
         symlink into blobs/); re-run `huggingface-cli download {repo_id}`",
        snapshot.display()
    )]
    SnapshotWithoutConfig { repo_id: String, snapshot: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn searched_list(searched: &[PathBuf]) -> String {
    if searched.is_empty() {
        return "There was no cache to search: HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME and HOME \
                are all unset."
            .into();
    }
    let mut s = String::from("Searched:");
    for p in searched {
        s.push_str("\n  ");
        s.push_str(&p.display().to_string());
    }
    s
}

/// Resolve `--model` against the process environment.
pub fn resolve_model(arg: &str) -> Result<ModelSource, HubError> {
    resolve_model_with(arg, &|key| std::env::var(key).ok())
}

/// Resolve `--model` with `env` standing in for `std::env::var` (tests pass a map).
pub fn resolve_model_with(
    arg: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ModelSource, HubError> {
    let lower = arg.to_ascii_lowercase();
    if PRESET_NAMES.contains(&lower.as_str()) {
        return Ok(ModelSource::Preset(lower));
    }

    let path = Path::new(arg);
    if path.is_dir() {
        let config = path.join("config.json");
        return if config.is_file() {
            Ok(ModelSource::Dir(path.to_path_buf()))
        } else {
            Err(HubError::DirWithoutConfig {
                dir: path.to_path_buf(),
            })
        };
    }
    if path.exists() {
        return Err(HubError::NotADirectory {
            path: path.to_path_buf(),
        });
    }

    let Some((org, name)) = split_repo_id(arg) else {
        return Err(HubError::Unrecognized { arg: arg.into() });
    };
    find_in_caches(arg, &format!("models--{org}--{name}"), &cache_roots(env))
}

/// `Org/Name` with hub-legal parts: ASCII letters, digits, `-`, `_`, `.`;
/// not starting or ending with `-` or `.`, and no `--` or `..` (the hub
/// forbids both; `--` would also make the cache folder name ambiguous).
fn split_repo_id(arg: &str) -> Option<(&str, &str)> {
    let (org, name) = arg.split_once('/')?;
    let legal = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
            && !part.contains("--")
            && !part.contains("..")
    };
    (legal(org) && legal(name)).then_some((org, name))
}

/// The cache roots to search, in order, without duplicates; unset or empty
/// variables are skipped.
fn cache_roots(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty()).map(PathBuf::from);
    let candidates = [
        var("HF_HUB_CACHE"),
        var("HF_HOME").map(|p| p.join("hub")),
        var("XDG_CACHE_HOME").map(|p| p.join("huggingface").join("hub")),
        var("HOME").map(|p| p.join(".cache").join("huggingface").join("hub")),
    ];
    let mut roots: Vec<PathBuf> = Vec::new();
    for root in candidates.into_iter().flatten() {
        if !roots.contains(&root) {
            roots.push(root);
        }
    }
    roots
}

/// The first root holding a complete snapshot wins. When none does, the
/// first broken copy found (bad ref, missing snapshot, ...) is the error,
/// since it says more than "not found".
fn find_in_caches(repo_id: &str, folder: &str, roots: &[PathBuf]) -> Result<ModelSource, HubError> {
    let mut searched = Vec::new();
    let mut first_problem = None;
    for root in roots {
        let repo = root.join(folder);
        searched.push(repo.clone());
        if !repo.is_dir() {
            continue;
        }
        match snapshot_of(repo_id, &repo) {
            Ok(found) => return Ok(found),
            Err(e) => {
                first_problem.get_or_insert(e);
            }
        }
    }
    Err(first_problem.unwrap_or_else(|| HubError::NotCached {
        repo_id: repo_id.into(),
        searched,
    }))
}

fn snapshot_of(repo_id: &str, repo: &Path) -> Result<ModelSource, HubError> {
    let ref_file = repo.join("refs").join("main");
    let bytes = match std::fs::read(&ref_file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HubError::MissingRef {
                repo_id: repo_id.into(),
                ref_file,
            })
        }
        Err(source) => {
            return Err(HubError::Io {
                path: ref_file,
                source,
            })
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let commit = text.trim();
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Keep the message one screen long whatever the file holds.
        let content: String = text.chars().take(80).collect();
        return Err(HubError::BadRef {
            repo_id: repo_id.into(),
            ref_file,
            content,
        });
    }
    let snapshot = repo.join("snapshots").join(commit);
    if !snapshot.is_dir() {
        return Err(HubError::MissingSnapshot {
            repo_id: repo_id.into(),
            commit: commit.into(),
            snapshot,
        });
    }
    // is_file follows the symlink into blobs/, so a dangling link fails here.
    if !snapshot.join("config.json").is_file() {
        return Err(HubError::SnapshotWithoutConfig {
            repo_id: repo_id.into(),
            snapshot,
        });
    }
    Ok(ModelSource::HubCache {
        repo_id: repo_id.into(),
        commit: commit.into(),
        dir: snapshot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const COMMIT: &str = "91b2b3a4c5d6e7f8091a2b3c4d5e6f7081928374";
    const REPO: &str = "Qwen/Qwen2-1.5B-Instruct";
    const FOLDER: &str = "models--Qwen--Qwen2-1.5B-Instruct";

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("workbench-hub-{tag}-{}-{n}", std::process::id()));
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

    fn env_of(pairs: &[(&str, &Path)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Lay out `<root>/models--Org--Name` as huggingface_hub does; returns the snapshot dir.
    fn fake_cache(root: &Path, ref_text: Option<&str>, snapshot: bool, config: bool) -> PathBuf {
        let repo = root.join(FOLDER);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        if let Some(t) = ref_text {
            std::fs::write(repo.join("refs/main"), t).unwrap();
        }
        let snap = repo.join("snapshots").join(COMMIT);
        if snapshot {
            std::fs::create_dir_all(&snap).unwrap();
        }
        if config {
            std::fs::write(snap.join("config.json"), "{}").unwrap();
        }
        snap
    }

    fn complete_cache(root: &Path) -> PathBuf {
        fake_cache(root, Some(&format!("{COMMIT}\n")), true, true)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn presets_resolve_in_any_case() {
        for (arg, want) in [
            ("qwen2-0.5b", "qwen2-0.5b"),
            ("Qwen2-1.5B", "qwen2-1.5b"),
            ("QWEN2-7B", "qwen2-7b"),
        ] {
            assert_eq!(
                resolve_model_with(arg, &no_env).unwrap(),
                ModelSource::Preset(want.into())
            );
        }
    }

    #[test]
    fn directory_with_config() {
        let t = TempDir::new("dir");
        std::fs::write(t.0.join("config.json"), "{}").unwrap();
        let arg = t.0.display().to_string();
        let got = resolve_model_with(&arg, &no_env).unwrap();
        assert_eq!(got, ModelSource::Dir(t.0.clone()));
        assert_eq!(got.dir(), Some(t.0.as_path()));
    }

    #[test]
    fn directory_without_config_is_named() {
        let t = TempDir::new("noconfig");
        let arg = t.0.display().to_string();
        let e = resolve_model_with(&arg, &no_env).unwrap_err();
        assert!(matches!(e, HubError::DirWithoutConfig { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&arg) && msg.contains("config.json"), "{msg}");
    }

    #[test]
    fn a_file_is_not_a_model_dir() {
        let t = TempDir::new("file");
        let file = t.0.join("config.json");
        std::fs::write(&file, "{}").unwrap();
        let e = resolve_model_with(&file.display().to_string(), &no_env).unwrap_err();
        assert!(matches!(e, HubError::NotADirectory { .. }), "{e}");
        assert!(e.to_string().contains(&file.display().to_string()));
    }

    #[test]
    fn garbage_lists_the_presets() {
        for arg in [
            "not a model",
            "a/b/c",
            "/nonexistent-workbench-dir",
            "Org/--x",
        ] {
            let e = resolve_model_with(arg, &no_env).unwrap_err();
            assert!(matches!(e, HubError::Unrecognized { .. }), "{arg}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(arg) && msg.contains("qwen2-0.5b"), "{msg}");
        }
    }

    #[test]
    fn hub_id_in_hf_hub_cache_with_whitespace_in_ref() {
        let t = TempDir::new("hubcache");
        let snap = fake_cache(&t.0, Some(&format!("  {COMMIT}\r\n")), true, true);
        let env = env_of(&[("HF_HUB_CACHE", &t.0)]);
        assert_eq!(
            resolve_model_with(REPO, &env).unwrap(),
            ModelSource::HubCache {
                repo_id: REPO.into(),
                commit: COMMIT.into(),
                dir: snap,
            }
        );
    }

    #[test]
    fn search_order_hub_cache_then_hf_home_then_home() {
        let a = TempDir::new("order-a");
        let b = TempDir::new("order-b");
        let c = TempDir::new("order-c");
        let hub_b = b.0.join("hub");
        let hub_c = c.0.join(".cache/huggingface/hub");
        let snap_b = complete_cache(&hub_b);
        let snap_c = complete_cache(&hub_c);
        let env = env_of(&[("HF_HUB_CACHE", &a.0), ("HF_HOME", &b.0), ("HOME", &c.0)]);
        // Not in HF_HUB_CACHE: HF_HOME/hub wins over HOME.
        assert_eq!(
            resolve_model_with(REPO, &env).unwrap().dir(),
            Some(snap_b.as_path())
        );
        // Only under HOME.
        let env = env_of(&[("HF_HUB_CACHE", &a.0), ("HOME", &c.0)]);
        assert_eq!(
            resolve_model_with(REPO, &env).unwrap().dir(),
            Some(snap_c.as_path())
        );
        // HF_HUB_CACHE first when it has it.
        let snap_a = complete_cache(&a.0);
        let env = env_of(&[("HF_HUB_CACHE", &a.0), ("HF_HOME", &b.0), ("HOME", &c.0)]);
        assert_eq!(
            resolve_model_with(REPO, &env).unwrap().dir(),
            Some(snap_a.as_path())
        );
    }

    #[test]
    fn not_cached_lists_every_path_and_the_fix() {
        let a = TempDir::new("nf-a");
        let b = TempDir::new("nf-b");
        let c = TempDir::new("nf-c");
        let env = env_of(&[
            ("HF_HUB_CACHE", &a.0),
            ("HF_HOME", &b.0),
            ("XDG_CACHE_HOME", &c.0),
            ("HOME", &c.0),
        ]);
        let e = resolve_model_with(REPO, &env).unwrap_err();
        let msg = e.to_string();
        for p in [
            a.0.join(FOLDER),
            b.0.join("hub").join(FOLDER),
            c.0.join("huggingface/hub").join(FOLDER),
            c.0.join(".cache/huggingface/hub").join(FOLDER),
        ] {
            assert!(
                msg.contains(&p.display().to_string()),
                "{p:?} missing from: {msg}"
            );
        }
        assert!(
            msg.contains(&format!("huggingface-cli download {REPO}")),
            "{msg}"
        );
        assert!(msg.contains("directory"), "{msg}");
    }

    #[test]
    fn not_cached_without_any_root_says_so() {
        let msg = resolve_model_with(REPO, &no_env).unwrap_err().to_string();
        assert!(
            msg.contains("HF_HUB_CACHE") && msg.contains("HOME"),
            "{msg}"
        );
        assert!(msg.contains("huggingface-cli download"), "{msg}");
    }

    #[test]
    fn bad_ref_names_the_file_and_content() {
        let t = TempDir::new("badref");
        fake_cache(&t.0, Some("main-is-not-a-hash\n"), true, true);
        let e = resolve_model_with(REPO, &env_of(&[("HF_HUB_CACHE", &t.0)])).unwrap_err();
        assert!(matches!(e, HubError::BadRef { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("refs/main") && msg.contains("main-is-not-a-hash"),
            "{msg}"
        );
        // 40 characters but not hex.
        let t = TempDir::new("badref2");
        fake_cache(&t.0, Some(&"g".repeat(40)), true, true);
        let e = resolve_model_with(REPO, &env_of(&[("HF_HUB_CACHE", &t.0)])).unwrap_err();
        assert!(matches!(e, HubError::BadRef { .. }), "{e}");
    }

    #[test]
    fn missing_ref_is_its_own_error() {
        let t = TempDir::new("noref");
        fake_cache(&t.0, None, true, true);
        let e = resolve_model_with(REPO, &env_of(&[("HF_HUB_CACHE", &t.0)])).unwrap_err();
        assert!(matches!(e, HubError::MissingRef { .. }), "{e}");
        assert!(e.to_string().contains("refs/main"), "{e}");
    }

    #[test]
    fn missing_snapshot_names_commit_and_path() {
        let t = TempDir::new("nosnap");
        let snap = fake_cache(&t.0, Some(COMMIT), false, false);
        let e = resolve_model_with(REPO, &env_of(&[("HF_HUB_CACHE", &t.0)])).unwrap_err();
        assert!(matches!(e, HubError::MissingSnapshot { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(COMMIT) && msg.contains(&snap.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn snapshot_without_config_is_named() {
        let t = TempDir::new("snapnoconfig");
        let snap = fake_cache(&t.0, Some(COMMIT), true, false);
        let e = resolve_model_with(REPO, &env_of(&[("HF_HUB_CACHE", &t.0)])).unwrap_err();
        assert!(matches!(e, HubError::SnapshotWithoutConfig { .. }), "{e}");
        assert!(e.to_string().contains(&snap.display().to_string()), "{e}");
    }

    #[test]
    fn a_broken_copy_does_not_hide_a_good_one_later() {
        let a = TempDir::new("broken-a");
        let b = TempDir::new("broken-b");
        fake_cache(&a.0, Some("oops"), false, false);
        let snap = complete_cache(&b.0.join("hub"));
        let env = env_of(&[("HF_HUB_CACHE", &a.0), ("HF_HOME", &b.0)]);
        assert_eq!(
            resolve_model_with(REPO, &env).unwrap().dir(),
            Some(snap.as_path())
        );
    }

    #[test]
    fn repo_id_syntax() {
        assert_eq!(split_repo_id("Qwen/Qwen2-7B"), Some(("Qwen", "Qwen2-7B")));
        assert_eq!(split_repo_id("a_b/c.d"), Some(("a_b", "c.d")));
        for bad in [
            "Qwen", "/x", "x/", "a/b/c", "a--b/c", "a/..", "./x", "a/b c",
        ] {
            assert_eq!(split_repo_id(bad), None, "{bad}");
        }
    }
}
