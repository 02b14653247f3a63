//! Finding a model on disk: an explicit path, or a name from `models/manifest.json`.
//! Never the network: a model that is not on disk is an error telling how to fetch it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One entry of `models/manifest.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub source: String,
    pub license: String,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("model `{0}` not found: it is neither a file nor a name in models/manifest.json{1}")]
    Unknown(String, String),
    #[error("{path}: the model file is not on disk; fetch it with `{fetch}`")]
    NotFetched { path: PathBuf, fetch: String },
    #[error("no -m/--model given and no models/manifest.json found (looked in $HEARTH_MODELS_DIR, ./models and beside the executable)")]
    NoManifest,
    #[error("{path}: {message}")]
    BadManifest { path: PathBuf, message: String },
}

/// The folder holding `manifest.json`: `$HEARTH_MODELS_DIR`, `./models`, or a `models/`
/// in a parent of the executable's folder (so `target/release/hearth` finds the repo's).
pub fn models_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HEARTH_MODELS_DIR") {
        return Some(PathBuf::from(d));
    }
    let here = PathBuf::from("models");
    if here.join("manifest.json").is_file() {
        return Some(here);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .map(|a| a.join("models"))
        .find(|m| m.join("manifest.json").is_file())
}

pub fn read_manifest(dir: &Path) -> Result<Vec<ManifestEntry>, LocateError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LocateError::BadManifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| LocateError::BadManifest {
        path,
        message: e.to_string(),
    })
}

/// Resolves `-m` (a path or a manifest name), or the default model when absent.
pub fn resolve_model(arg: Option<&str>) -> Result<PathBuf, LocateError> {
    if let Some(a) = arg {
        let p = Path::new(a);
        if p.exists() {
            return Ok(p.to_path_buf());
        }
    }
    let Some(dir) = models_dir() else {
        return match arg {
            Some(a) => Err(LocateError::Unknown(a.to_owned(), String::new())),
            None => Err(LocateError::NoManifest),
        };
    };
    let entries = read_manifest(&dir)?;
    let entry = match arg {
        Some(a) => entries.iter().find(|e| e.name == a || e.file == a),
        None => entries.iter().find(|e| e.default),
    };
    let Some(entry) = entry else {
        let known: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        return Err(LocateError::Unknown(
            arg.unwrap_or("<default>").to_owned(),
            format!(" (known: {})", known.join(", ")),
        ));
    };
    let path = dir.join(&entry.file);
    if !path.is_file() {
        return Err(LocateError::NotFetched {
            path,
            fetch: "scripts/fetch-default-model".into(),
        });
    }
    Ok(path)
}
