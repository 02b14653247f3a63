//! Pinned model files: a file's expected SHA-256 comes from `--sha256`, from
//! `models/manifest.toml`, or from a `manifest.toml` in the file's own folder; the file is
//! hashed (streaming, with progress) and compared before it is loaded. A mismatch is an
//! error naming both hashes.
//!
//! Hashing a large model on every start is slow, so results are cached by the file's
//! identity: size and modification time (and, on Unix, inode and change time, which no
//! ordinary tool can set back). `hearth models verify` ignores the cache and rehashes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::locate::{self, LocateError};

/// Whether `s` is 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A file's expected hash and where that expectation comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Pin {
    pub sha256: String,
    /// `--sha256`, or the manifest (and its entry's name).
    pub from: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: sha256 mismatch: the file hashes to {actual}, but {from} pins {expected}; refusing to load it (replace the file, or update the pin if the file changed on purpose)")]
    Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
        from: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--sha256 `{0}` is not a SHA-256 (64 hex digits)")]
    BadPin(String),
    #[error(transparent)]
    Manifest(#[from] LocateError),
}

/// The pin for `path`: `explicit` (`--sha256`), else an entry of `models/manifest.toml`
/// for the same file, else one of a `manifest.toml` beside it. `None`: unpinned.
pub fn find_pin(path: &Path, explicit: Option<&str>) -> Result<Option<Pin>, PinError> {
    if let Some(hex) = explicit {
        let hex = hex.trim().to_ascii_lowercase();
        if !is_sha256_hex(&hex) {
            return Err(PinError::BadPin(hex));
        }
        return Ok(Some(Pin {
            sha256: hex,
            from: "--sha256".into(),
        }));
    }
    let target = std::fs::canonicalize(path).map_err(|source| PinError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let beside = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .map(Path::to_path_buf);
    for dir in locate::models_dir().into_iter().chain(beside) {
        if !dir.join(locate::MANIFEST).is_file() {
            continue;
        }
        let manifest = locate::read_manifest(&dir)?;
        if let Some(e) = manifest.entry_for(&target) {
            return Ok(Some(Pin {
                sha256: e.sha256.clone(),
                from: format!(
                    "{} (model `{}`)",
                    dir.join(locate::MANIFEST).display(),
                    e.name
                ),
            }));
        }
    }
    Ok(None)
}

/// SHA-256 of a file, read in 1 MiB pieces; `progress(done, total)` after each.
pub fn sha256_file(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<String, PinError> {
    let io = |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let total = f.metadata().map_err(io)?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    Ok(hex(&hasher.finalize()))
}

/// Bytes as lower-case hex (hashes, keys, identifiers).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// What identifies a file's contents without reading them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Identity {
    size: u64,
    mtime_ns: u128,
    #[serde(default)]
    ctime_ns: i128,
    #[serde(default)]
    inode: u64,
    sha256: String,
}

fn identity(meta: &std::fs::Metadata, sha256: String) -> Identity {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    #[cfg(unix)]
    let (ctime_ns, inode) = {
        use std::os::unix::fs::MetadataExt;
        (
            i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            meta.ino(),
        )
    };
    #[cfg(not(unix))]
    let (ctime_ns, inode) = (0, 0);
    Identity {
        size: meta.len(),
        mtime_ns,
        ctime_ns,
        inode,
        sha256,
    }
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    files: BTreeMap<String, Identity>,
}

/// Hashes already computed, by file identity, in a JSON file.
#[derive(Clone, Debug)]
pub struct HashCache {
    path: PathBuf,
}

impl HashCache {
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// `$HEARTH_CACHE_DIR/sha256.json`, else under `$XDG_CACHE_HOME/hearth` or
    /// `~/.cache/hearth`.
    pub fn default_location() -> Option<Self> {
        let dir = std::env::var_os("HEARTH_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hearth")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("hearth"))
            })?;
        Some(Self::at(dir.join("sha256.json")))
    }

    fn read(&self) -> CacheFile {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The cached hash of `file`, if its identity is unchanged.
    fn lookup(&self, key: &str, meta: &std::fs::Metadata) -> Option<String> {
        let cached = self.read().files.remove(key)?;
        (identity(meta, cached.sha256.clone()) == cached).then_some(cached.sha256)
    }

    /// Records `sha256` for `file`; failures only log (the cache is an optimisation).
    fn store(&self, key: &str, meta: &std::fs::Metadata, sha256: &str) {
        let mut file = self.read();
        file.files
            .insert(key.to_owned(), identity(meta, sha256.to_owned()));
        let result = (|| {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self
                .path
                .with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, serde_json::to_vec_pretty(&file).unwrap_or_default())?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            tracing::warn!("cannot write the hash cache {}: {e}", self.path.display());
        }
    }
}

/// How a file's hash was obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hashed {
    /// From the cache: the file is unchanged since it was last hashed.
    Cached,
    /// Read whole just now.
    Read,
}

/// The file's SHA-256: from `cache` when `use_cached` and the file's identity is
/// unchanged, else read (and then recorded in `cache`).
pub fn hash_with_cache(
    path: &Path,
    cache: Option<&HashCache>,
    use_cached: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, Hashed), PinError> {
    let io = |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    };
    let canonical = std::fs::canonicalize(path).map_err(io)?;
    let key = canonical.display().to_string();
    let before = std::fs::metadata(&canonical).map_err(io)?;
    if let Some(sha) = cache
        .filter(|_| use_cached)
        .and_then(|c| c.lookup(&key, &before))
    {
        return Ok((sha, Hashed::Cached));
    }
    let sha = sha256_file(&canonical, progress)?;
    // Cache only what cannot have changed while it was read.
    let after = std::fs::metadata(&canonical).map_err(io)?;
    if let Some(c) = cache {
        if identity(&before, String::new()) == identity(&after, String::new()) {
            c.store(&key, &after, &sha);
        }
    }
    Ok((sha, Hashed::Read))
}

/// Checks `path` against `pin`.
pub fn verify(
    path: &Path,
    pin: &Pin,
    cache: Option<&HashCache>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Hashed, PinError> {
    let (actual, how) = hash_with_cache(path, cache, true, progress)?;
    if actual != pin.sha256 {
        return Err(PinError::Mismatch {
            path: path.to_path_buf(),
            expected: pin.sha256.clone(),
            actual,
            from: pin.from.clone(),
        });
    }
    Ok(how)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn hashes_pins_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, "abc").unwrap();
        let mut calls = 0;
        assert_eq!(sha256_file(&file, &mut |_, _| calls += 1).unwrap(), ABC);
        assert_eq!(calls, 1);

        // A manifest beside the file pins it.
        std::fs::write(
            dir.path().join("manifest.toml"),
            format!("[[model]]\nname = \"m\"\nfile = \"m.gguf\"\nsha256 = \"{ABC}\"\n"),
        )
        .unwrap();
        let pin = find_pin(&file, None).unwrap().unwrap();
        assert_eq!(pin.sha256, ABC);
        assert!(pin.from.contains("manifest.toml") && pin.from.contains("`m`"));
        // --sha256 wins, upper case accepted, garbage refused.
        let explicit = find_pin(&file, Some(&ABC.to_uppercase())).unwrap().unwrap();
        assert_eq!(explicit.from, "--sha256");
        assert!(matches!(
            find_pin(&file, Some("xyz")),
            Err(PinError::BadPin(_))
        ));
        let other = dir.path().join("other.gguf");
        std::fs::write(&other, "x").unwrap();
        assert_eq!(find_pin(&other, None).unwrap(), None);

        let cache = HashCache::at(dir.path().join("cache/sha256.json"));
        assert_eq!(
            verify(&file, &pin, Some(&cache), &mut |_, _| {}).unwrap(),
            Hashed::Read
        );
        assert_eq!(
            verify(&file, &pin, Some(&cache), &mut |_, _| {}).unwrap(),
            Hashed::Cached
        );
        // Changed contents of the same size, with the old mtime put back: the change
        // time gives it away, so it is hashed again and refused.
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, "abd").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
        let err = verify(&file, &pin, Some(&cache), &mut |_, _| {}).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(ABC) && msg.contains("m.gguf") && msg.contains("mismatch"),
            "{msg}"
        );
        // A cache file that is garbage is ignored.
        std::fs::write(dir.path().join("cache/sha256.json"), "{{{").unwrap();
        std::fs::write(&file, "abc").unwrap();
        assert_eq!(
            verify(&file, &pin, Some(&cache), &mut |_, _| {}).unwrap(),
            Hashed::Read
        );
    }
}
