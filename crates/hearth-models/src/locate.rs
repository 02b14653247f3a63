//! Finding a model on disk: an explicit path, or a name from `models/manifest.toml`.
//! Never the network: a model that is not on disk is an error telling how to fetch it.
//!
//! A manifest lists models by name, each with its file, the file's sha256 (its pin), where
//! it came from and its license. The same format next to any model file (a
//! `manifest.toml` in its folder) pins that file too; see [`crate::pin`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The manifest's file name, in `models/` or beside a model.
pub const MANIFEST: &str = "manifest.toml";

/// One `[[model]]` of a manifest.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub name: String,
    /// The file, relative to the manifest's folder.
    pub file: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
    /// How the file was obtained.
    #[serde(default)]
    pub source: Option<String>,
    /// Where the model itself comes from (its publisher's page).
    #[serde(default)]
    pub origin: Option<String>,
    /// An SPDX license id or name.
    #[serde(default)]
    pub license: Option<String>,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    model: Vec<ManifestEntry>,
}

/// A manifest read from its folder.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// The path of an entry's file.
    pub fn path_of(&self, e: &ManifestEntry) -> PathBuf {
        self.dir.join(&e.file)
    }

    /// The entry whose file is `path` (compared as canonical paths).
    pub fn entry_for(&self, path: &Path) -> Option<&ManifestEntry> {
        let target = std::fs::canonicalize(path).ok()?;
        self.entries
            .iter()
            .find(|e| std::fs::canonicalize(self.path_of(e)).is_ok_and(|p| p == target))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("model `{0}` not found: it is neither a file nor a name in models/manifest.toml{1}")]
    Unknown(String, String),
    #[error("{path}: the model file is not on disk; fetch it with `{fetch}`")]
    NotFetched { path: PathBuf, fetch: String },
    #[error("no -m/--model given and no models/manifest.toml found (looked in $HEARTH_MODELS_DIR, ./models and beside the executable)")]
    NoManifest,
    #[error("{path}: {message}")]
    BadManifest { path: PathBuf, message: String },
    #[error("model `{id}` is not in the local Hugging Face cache (searched: {searched}). Hearth never downloads: on a machine with network access run `huggingface-cli download {repo}` (or `hf download {repo}`), copy its cache folder `{folder}` into one of the folders searched here (or point HF_HUB_CACHE at where you put it), or pass the model folder itself with -m")]
    NotInHfCache {
        id: String,
        repo: String,
        folder: String,
        searched: String,
    },
}

/// The folder holding `manifest.toml`: `$HEARTH_MODELS_DIR`, `./models`, or a `models/`
/// in a parent of the executable's folder (so `target/release/hearth` finds the repo's).
pub fn models_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HEARTH_MODELS_DIR") {
        return Some(PathBuf::from(d));
    }
    let here = PathBuf::from("models");
    if here.join(MANIFEST).is_file() {
        return Some(here);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .map(|a| a.join("models"))
        .find(|m| m.join(MANIFEST).is_file())
}

/// Parses a manifest's text; `path` names it in errors. Entries must have plain names
/// (unique), relative file names without `..`, and 64-hex-digit hashes.
pub fn parse_manifest(path: &Path, text: &str) -> Result<Vec<ManifestEntry>, LocateError> {
    let bad = |message: String| LocateError::BadManifest {
        path: path.to_path_buf(),
        message,
    };
    let file: ManifestFile = toml::from_str(text).map_err(|e| bad(crate::toml_error(text, &e)))?;
    let mut names = std::collections::HashSet::new();
    for (i, e) in file.model.iter().enumerate() {
        let at = format!("model {} (`{}`)", i + 1, e.name);
        if e.name.is_empty() || !names.insert(e.name.as_str()) {
            return Err(bad(format!("{at}: names must be present and unique")));
        }
        let p = Path::new(&e.file);
        if e.file.is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(format!(
                "{at}: `file` must be a path inside the manifest's folder"
            )));
        }
        if !crate::pin::is_sha256_hex(&e.sha256) {
            return Err(bad(format!(
                "{at}: sha256 must be 64 lower-case hex digits"
            )));
        }
    }
    if file.model.iter().filter(|e| e.default).count() > 1 {
        return Err(bad("more than one model is marked default".into()));
    }
    Ok(file.model)
}

/// Reads `DIR/manifest.toml`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, LocateError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| LocateError::BadManifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Manifest {
        dir: dir.to_path_buf(),
        entries: parse_manifest(&path, &text)?,
    })
}

/// The Hugging Face hub caches to look in: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(d)];
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(h).join("hub")];
    }
    std::env::var_os("HOME")
        .map(|h| vec![PathBuf::from(h).join(".cache/huggingface/hub")])
        .unwrap_or_default()
}

/// Whether `-m` names a hub repository (`org/name`, `org/name@revision`) rather than a
/// path.
fn is_repo_id(a: &str) -> bool {
    let id = a.split('@').next().unwrap_or(a);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !id.ends_with(".gguf")
}

/// The snapshot folder of `org/name[@revision]` in the local Hugging Face cache (read
/// through hf-hub's cache layout: `models--org--name/refs/<revision>` names the commit,
/// `snapshots/<commit>/` holds the files). Never the network.
pub fn resolve_hf(id: &str) -> Result<PathBuf, LocateError> {
    let (repo, revision) = match id.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (id, "main"),
    };
    let dirs = hf_cache_dirs();
    let hub_repo = || {
        hf_hub::Repo::with_revision(
            repo.to_owned(),
            hf_hub::RepoType::Model,
            revision.to_owned(),
        )
    };
    let folder = hub_repo().folder_name();
    for dir in &dirs {
        let cache = hf_hub::Cache::new(dir.clone());
        if let Some(config) = cache.repo(hub_repo()).get("config.json") {
            if let Some(snapshot) = config.parent() {
                return Ok(snapshot.to_path_buf());
            }
        }
        // A commit hash given as the revision names its snapshot directly.
        let snapshot = dir.join(&folder).join("snapshots").join(revision);
        if revision.len() >= 7
            && revision.chars().all(|c| c.is_ascii_hexdigit())
            && snapshot.join("config.json").is_file()
        {
            return Ok(snapshot);
        }
    }
    Err(LocateError::NotInHfCache {
        id: id.to_owned(),
        repo: repo.to_owned(),
        folder: folder.clone(),
        searched: if dirs.is_empty() {
            "no cache folder: HF_HUB_CACHE, HF_HOME and HOME are unset".into()
        } else {
            dirs.iter()
                .map(|d| d.join(&folder).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

/// Resolves `-m` (a path, a manifest name, or `org/name[@revision]` from the local
/// Hugging Face cache), or the default model when absent.
pub fn resolve_model(arg: Option<&str>) -> Result<PathBuf, LocateError> {
    if let Some(a) = arg {
        let p = Path::new(a);
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        if is_repo_id(a) {
            return resolve_hf(a);
        }
    }
    let Some(dir) = models_dir() else {
        return match arg {
            Some(a) => Err(LocateError::Unknown(a.to_owned(), String::new())),
            None => Err(LocateError::NoManifest),
        };
    };
    let manifest = read_manifest(&dir)?;
    let entry = match arg {
        Some(a) => manifest.entries.iter().find(|e| e.name == a || e.file == a),
        None => manifest.entries.iter().find(|e| e.default),
    };
    let Some(entry) = entry else {
        let known: Vec<&str> = manifest.entries.iter().map(|e| e.name.as_str()).collect();
        return Err(LocateError::Unknown(
            arg.unwrap_or("<default>").to_owned(),
            format!(" (known: {})", known.join(", ")),
        ));
    };
    let path = manifest.path_of(entry);
    if !path.is_file() {
        return Err(LocateError::NotFetched {
            path,
            fetch: "scripts/fetch-default-model".into(),
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        for id in [
            "Qwen/Qwen2.5-0.5B-Instruct",
            "meta-llama/Llama-3.2-1B@main",
            "a/b@0123abc",
        ] {
            assert!(is_repo_id(id), "{id}");
        }
        for p in [
            "model.gguf",
            "models/x.gguf",
            "./a/b",
            "/a/b",
            "a/b/c",
            "a/",
            "../b",
        ] {
            assert!(!is_repo_id(p), "{p}");
        }
    }

    #[test]
    fn manifests_are_checked() {
        let p = Path::new("m/manifest.toml");
        let h = "a".repeat(64);
        let ok = format!(
            "[[model]]\nname = \"a\"\nfile = \"a.gguf\"\nsha256 = \"{h}\"\ndefault = true\n"
        );
        assert_eq!(parse_manifest(p, &ok).unwrap().len(), 1);
        for (text, want) in [
            (ok.replace("a.gguf", "../a.gguf"), "inside"),
            (ok.replace("a.gguf", "/etc/a.gguf"), "inside"),
            (ok.replace(&h, "abc"), "64"),
            (format!("{ok}{ok}"), "unique"),
            (ok.replace("default", "defualt"), "unknown field"),
            (ok.replace("name = \"a\"\n", ""), "missing field `name`"),
            ("[[model]\n".to_string(), "line 1"),
        ] {
            let err = parse_manifest(p, &text).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("m/manifest.toml"),
                "{text:?}: {err}"
            );
        }
    }
}
