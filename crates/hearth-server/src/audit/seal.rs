//! What makes the audit chain hold against someone who can write the log file: a
//! secret chain key (each line's `prev` is an HMAC-SHA256 of the line before, so only
//! the key holder can rebuild the chain) and an Ed25519 signing key for checkpoints
//! (so a verifier holding only the public key can tell that the log held a given head
//! at a given seq). The latest checkpoint is also kept beside the log in a small
//! sidecar file, so cutting the log's tail together with its checkpoints is seen.
//!
//! Both primitives come from `ring` (already linked for TLS): no new dependency.
//!
//! File formats:
//! - chain key: the secret as hex, at least 32 bytes (64 hex digits); whitespace around
//!   it and `#` comment lines are ignored. `openssl rand -hex 32 > chain.key`.
//! - signing key: PEM `PRIVATE KEY`, Ed25519 PKCS#8 (`hearth audit keygen` writes it).
//! - public key: PEM `PUBLIC KEY`, Ed25519 SubjectPublicKeyInfo (OpenSSL reads it).
//! - sidecar `LOG.checkpoint`: one JSON object `{"seq","head","time","signature"}`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use hearth_models::pin::hex;

/// What can go wrong with a key or sidecar file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Format { path: PathBuf, problem: String },
    #[error("{path}: readable by group or others (mode {mode:04o}); a secret key must be private: chmod 600 {path}")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("cannot generate a key: the system's random source failed")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format(path: &Path, problem: impl Into<String>) -> SealError {
    SealError::Format {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Reads a secret file, refusing one that group or others may read (on unix).
fn read_secret(path: &Path) -> Result<String, SealError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io(path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    std::fs::read_to_string(path).map_err(io(path))
}

/// Writes `text` to a new file only its owner may read.
fn write_private(path: &Path, text: &str) -> Result<(), SealError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// The secret that keys the chain's links.
#[derive(Clone)]
pub struct ChainKey(ring::hmac::Key);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(..)")
    }
}

impl ChainKey {
    /// The name lines keyed with it carry in their `chain` field.
    pub const SCHEME: &'static str = "hmac-sha256";

    pub fn from_secret(secret: &[u8]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// Reads a chain key file (hex, at least 32 bytes; `#` lines ignored).
    pub fn read(path: &Path) -> Result<Self, SealError> {
        let text = read_secret(path)?;
        let digits: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .concat();
        let bytes = unhex(&digits).ok_or_else(|| {
            format(
                path,
                "not a chain key: expected the secret as hex digits (e.g. `openssl rand -hex 32`)",
            )
        })?;
        if bytes.len() < 32 {
            return Err(format(
                path,
                format!(
                    "the chain key is {} bytes; at least 32 are needed (64 hex digits)",
                    bytes.len()
                ),
            ));
        }
        Ok(Self::from_secret(&bytes))
    }

    /// A new random secret as the file's text.
    pub fn generate() -> Result<String, SealError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|_| SealError::Random)?;
        Ok(format!("{}\n", hex(&secret)))
    }

    /// The link to `line`: HMAC-SHA256 of its bytes, as hex.
    pub fn link(&self, line: &[u8]) -> String {
        hex(ring::hmac::sign(&self.0, line).as_ref())
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

const SPKI_ED25519: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unpem(path: &Path, text: &str, label: &str) -> Result<Vec<u8>, SealError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .ok_or_else(|| format(path, format!("not a PEM `{label}` file")))?;
    let b64: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| format(path, format!("the PEM `{label}` body is not base64")))
}

/// The Ed25519 key that signs checkpoints.
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Writes a new key pair: `PREFIX.key` (private, mode 0600) and `PREFIX.pub`; refuses
    /// to overwrite either. Returns both paths.
    pub fn generate(prefix: &Path) -> Result<(PathBuf, PathBuf), SealError> {
        let with = |ext: &str| {
            let mut p = prefix.as_os_str().to_owned();
            p.push(ext);
            PathBuf::from(p)
        };
        let (private, public) = (with(".key"), with(".pub"));
        if public.exists() {
            return Err(format(&public, "already exists; not overwritten"));
        }
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| SealError::Random)?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| SealError::Random)?;
        write_private(&private, &pem("PRIVATE KEY", pkcs8.as_ref()))?;
        let mut spki = SPKI_ED25519.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        std::fs::write(&public, pem("PUBLIC KEY", &spki)).map_err(io(&public))?;
        Ok((private, public))
    }

    pub fn read(path: &Path) -> Result<Self, SealError> {
        let der = unpem(path, &read_secret(path)?, "PRIVATE KEY")?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(Self)
            .map_err(|e| format(path, format!("not an Ed25519 PKCS#8 private key ({e})")))
    }

    /// The signature over checkpoint (`seq`, `head`, `time`), as hex.
    pub fn sign(&self, seq: u64, head: &str, time: &str) -> String {
        hex(self.0.sign(&message(seq, head, time)).as_ref())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.public_key().as_ref().to_vec())
    }
}

/// The Ed25519 key that checks checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct PublicKey(Vec<u8>);

impl PublicKey {
    pub fn read(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let der = unpem(path, &text, "PUBLIC KEY")?;
        match der.strip_prefix(&SPKI_ED25519[..]) {
            Some(raw) if raw.len() == 32 => Ok(Self(raw.to_vec())),
            _ => Err(format(path, "not an Ed25519 public key")),
        }
    }

    /// Whether `signature` (hex) signs checkpoint (`seq`, `head`, `time`).
    pub fn verifies(&self, seq: u64, head: &str, time: &str, signature: &str) -> bool {
        let Some(sig) = unhex(signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&message(seq, head, time), &sig)
            .is_ok()
    }
}

/// What a checkpoint signs: its seq, the link to the line before it and its time, under
/// a fixed label so the signature means nothing elsewhere.
fn message(seq: u64, head: &str, time: &str) -> Vec<u8> {
    format!("hearth-audit-checkpoint/v1\n{seq}\n{head}\n{time}\n").into_bytes()
}

/// The latest signed checkpoint, kept beside the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub seq: u64,
    pub head: String,
    pub time: String,
    pub signature: String,
}

impl Sidecar {
    /// `LOG.checkpoint`.
    pub fn path_for(log: &Path) -> PathBuf {
        let mut p = log.as_os_str().to_owned();
        p.push(".checkpoint");
        PathBuf::from(p)
    }

    /// Replaces the sidecar at `path` whole (a temporary file, synced, then renamed), so
    /// a crash leaves the old one or the new one, never a torn one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_string(self).map_err(std::io::Error::other)? + "\n";
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// The sidecar at `path`; `None` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, SealError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format(path, format!("not a checkpoint sidecar: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SealError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("audit");
        let (private, public) = SigningKey::generate(&prefix).unwrap();
        let key = SigningKey::read(&private).unwrap();
        let pubkey = PublicKey::read(&public).unwrap();
        assert_eq!(key.public(), pubkey);
        let sig = key.sign(7, "ab", "t");
        assert!(pubkey.verifies(7, "ab", "t", &sig));
        assert!(!pubkey.verifies(8, "ab", "t", &sig));
        assert!(!pubkey.verifies(7, "ac", "t", &sig));
        assert!(!pubkey.verifies(7, "ab", "u", &sig));
        assert!(!pubkey.verifies(7, "ab", "t", "zz"));
        // No overwriting, and a private key that others can read is refused.
        assert!(SigningKey::generate(&prefix).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
                0o600
            );
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = SigningKey::read(&private).unwrap_err().to_string();
            assert!(e.contains("chmod 600") && e.contains("audit.key"), "{e}");
        }
        assert!(PublicKey::read(&private).is_err());

        let chain = dir.path().join("chain.key");
        write_private(&chain, "# the chain key\n").unwrap();
        assert!(ChainKey::read(&chain).is_err());
        std::fs::remove_file(&chain).unwrap();
        write_private(&chain, "abcd\n").unwrap();
        let e = ChainKey::read(&chain).unwrap_err().to_string();
        assert!(e.contains("at least 32"), "{e}");
        std::fs::remove_file(&chain).unwrap();
        write_private(&chain, &ChainKey::generate().unwrap()).unwrap();
        let k = ChainKey::read(&chain).unwrap();
        assert_eq!(k.link(b"x").len(), 64);
        assert_ne!(k.link(b"x"), ChainKey::from_secret(&[0; 32]).link(b"x"));
    }
}
