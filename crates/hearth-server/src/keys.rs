//! API keys: the keys file (TOML) and the limits each key carries.
//!
//! The file holds named keys as SHA-256 hashes, never the keys themselves, each with the
//! models it may use and its limits (requests and tokens per minute, concurrent
//! requests). `hearth keys add|list|revoke` edits it; the server reads it at start and on
//! SIGHUP, swapping the whole set at once. Limit state is kept by key name, so a reload
//! neither resets a key's budget nor disturbs requests in flight.
//!
//! ```toml
//! [[key]]
//! name = "billing-app"
//! sha256 = "5e88…"            # of the key the client sends as `Bearer …`
//! models = ["*"]              # or the served names this key may use
//! requests_per_minute = 60    # each limit optional: absent = unlimited
//! tokens_per_minute = 20000   # prompt + completion tokens
//! max_concurrent = 4
//! created = "2026-11-28T03:24:17Z"
//! # revoked = "…"             # set by `hearth keys revoke`: the key no longer works
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hearth_models::pin::{hex, is_sha256_hex};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One key of the keys file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub name: String,
    /// Lower-case hex SHA-256 of the key.
    pub sha256: String,
    /// Served model names this key may use; `"*"` for any.
    #[serde(default = "any_model")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// When the key was revoked; a revoked key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

fn any_model() -> Vec<String> {
    vec!["*".into()]
}

/// The limits of one key; `None` = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

/// The keys file as a whole.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

const HEADER: &str = "# Hearth API keys: SHA-256 hashes of the keys, never the keys themselves.\n\
# Managed with `hearth keys add|list|revoke`; the server rereads this file on SIGHUP.\n\n";

impl KeysFile {
    /// Parses and checks the file's text: names unique and plain, hashes 64 hex digits and
    /// unique, model lists not empty, limits at least 1.
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        let file: KeysFile = toml::from_str(text)
            .map_err(|e| KeysError::Invalid(hearth_models::toml_error(text, &e)))?;
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, k) in file.keys.iter().enumerate() {
            let at = format!("key {} (`{}`)", i + 1, k.name);
            check_name(&k.name).map_err(|m| KeysError::Invalid(format!("{at}: {m}")))?;
            if !names.insert(k.name.as_str()) {
                return Err(KeysError::Invalid(format!("{at}: the name is used twice")));
            }
            if !is_sha256_hex(&k.sha256) {
                return Err(KeysError::Invalid(format!(
                    "{at}: sha256 must be 64 lower-case hex digits"
                )));
            }
            if !hashes.insert(k.sha256.as_str()) {
                return Err(KeysError::Invalid(format!(
                    "{at}: the same key hash appears twice"
                )));
            }
            if k.models.is_empty() || k.models.iter().any(|m| m.trim().is_empty()) {
                return Err(KeysError::Invalid(format!(
                    "{at}: models must list at least one model name, or \"*\""
                )));
            }
            if k.requests_per_minute == Some(0)
                || k.tokens_per_minute == Some(0)
                || k.max_concurrent == Some(0)
            {
                return Err(KeysError::Invalid(format!(
                    "{at}: a limit of 0 would refuse every request; revoke the key instead"
                )));
            }
        }
        Ok(file)
    }

    /// Reads and checks the file; errors name it.
    pub fn read(path: &Path) -> Result<Self, KeysError> {
        let file_error = |message: String| KeysError::File {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        Self::parse(&text).map_err(|e| file_error(e.to_string()))
    }

    /// Reads the file, or an empty one when it does not exist yet.
    pub fn read_or_empty(path: &Path) -> Result<Self, KeysError> {
        if path.exists() {
            Self::read(path)
        } else {
            Ok(Self::default())
        }
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("keys serialize");
        format!("{HEADER}{body}")
    }

    /// Writes the file whole: a temporary file beside it (owner read/write only), synced,
    /// then renamed over it, so a reader sees the old file or the new, never half of one.
    pub fn write(&self, path: &Path) -> Result<(), KeysError> {
        let file_error = |e: std::io::Error| KeysError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map_or("keys".into(), |n| n.to_string_lossy());
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let result = (|| {
            let mut f = options.open(&tmp)?;
            f.write_all(self.to_toml().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(file_error)
    }

    /// Adds a key named `name`; returns the key itself, which is stored nowhere.
    pub fn add(
        &mut self,
        name: &str,
        models: Vec<String>,
        limits: Limits,
        now: &str,
    ) -> Result<String, KeysError> {
        check_name(name).map_err(KeysError::Invalid)?;
        if self.keys.iter().any(|k| k.name == name) {
            return Err(KeysError::Invalid(format!(
                "a key named `{name}` exists already (revoked keys keep their name)"
            )));
        }
        let key = generate_key()?;
        let entry = KeyEntry {
            name: name.to_owned(),
            sha256: hash_key(&key),
            models: if models.is_empty() {
                any_model()
            } else {
                models
            },
            requests_per_minute: limits.requests_per_minute,
            tokens_per_minute: limits.tokens_per_minute,
            max_concurrent: limits.max_concurrent,
            created: Some(now.to_owned()),
            revoked: None,
        };
        self.keys.push(entry);
        // The same checks as reading the file back.
        Self::parse(&self.to_toml())?;
        Ok(key)
    }

    /// Marks the key `name` revoked at `now`.
    pub fn revoke(&mut self, name: &str, now: &str) -> Result<(), KeysError> {
        let Some(k) = self.keys.iter_mut().find(|k| k.name == name) else {
            return Err(KeysError::Invalid(format!("no key named `{name}`")));
        };
        if k.revoked.is_some() {
            return Err(KeysError::Invalid(format!(
                "key `{name}` is revoked already"
            )));
        }
        k.revoked = Some(now.to_owned());
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(plain) {
        return Err(format!(
            "key name `{name}` must be 1 to 64 letters, digits or -_.@"
        ));
    }
    Ok(())
}

/// A new key: `hk-` and 48 hex digits (192 random bits from the operating system).
pub fn generate_key() -> Result<String, KeysError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)
        .map_err(|e| KeysError::Invalid(format!("no randomness from the system: {e}")))?;
    Ok(format!("hk-{}", hex(&bytes)))
}

/// Lower-case hex SHA-256 of a key, as the keys file stores it.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Who a request's key belongs to and what it may do.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    models: Vec<String>,
    pub limits: Limits,
    revoked: bool,
}

impl Identity {
    pub fn may_use(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// The keys in force: hashes to identities. Built from the keys file and the plain keys of
/// `--api-key` / `HEARTH_API_KEYS` (named `cli-1`, `cli-2`, …: every model, no limits).
#[derive(Debug, Default)]
pub struct KeyStore {
    entries: Vec<([u8; 32], Arc<Identity>)>,
    /// A keys file is configured: keys are required even when it lists none.
    required: bool,
}

/// What a presented key turned out to be.
pub enum Lookup<'a> {
    Valid(&'a Arc<Identity>),
    Revoked(&'a Arc<Identity>),
    Unknown,
}

impl KeyStore {
    pub fn new(file: Option<&KeysFile>, plain: &[String]) -> Self {
        let mut entries = Vec::new();
        for (i, key) in plain.iter().enumerate() {
            let identity = Identity {
                name: format!("cli-{}", i + 1),
                models: any_model(),
                limits: Limits::default(),
                revoked: false,
            };
            entries.push((Sha256::digest(key.as_bytes()).into(), Arc::new(identity)));
        }
        for k in file.map_or(&[][..], |f| &f.keys) {
            let mut hash = [0u8; 32];
            for (i, b) in hash.iter_mut().enumerate() {
                // Checked by KeysFile::parse.
                *b = u8::from_str_radix(&k.sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
            }
            let identity = Identity {
                name: k.name.clone(),
                models: k.models.clone(),
                limits: Limits {
                    requests_per_minute: k.requests_per_minute,
                    tokens_per_minute: k.tokens_per_minute,
                    max_concurrent: k.max_concurrent,
                },
                revoked: k.revoked.is_some(),
            };
            entries.push((hash, Arc::new(identity)));
        }
        Self {
            required: file.is_some() || !entries.is_empty(),
            entries,
        }
    }

    /// Whether requests must present a key: yes with a keys file (even an empty one) or
    /// any plain key; no keys configured at all means no authentication.
    pub fn required(&self) -> bool {
        self.required
    }

    pub fn key_count(&self) -> usize {
        self.entries.len()
    }

    /// The identity of `presented`. Every stored hash is compared, in time that does not
    /// depend on where (or whether) it matches.
    pub fn lookup(&self, presented: &str) -> Lookup<'_> {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (stored, identity) in &self.entries {
            let diff = stored.iter().zip(&h).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(diff) == 0 {
                found = Some(identity);
            }
        }
        match found {
            Some(i) if i.revoked => Lookup::Revoked(i),
            Some(i) => Lookup::Valid(i),
            None => Lookup::Unknown,
        }
    }
}

/// Per-key request and token budgets (token buckets refilled continuously, each holding
/// at most one minute's worth) and in-flight counts, kept by key name.
///
/// A generation request holds the most tokens it can use (prompt + `max_tokens` for each
/// choice) from the time it is accepted ([`Limiter::reserve`]) and gives back what it did
/// not use when it ends ([`Limiter::settle`]), so requests running side by side cannot
/// together spend more than the key's budget.
#[derive(Debug, Default)]
pub struct Limiter {
    state: Mutex<HashMap<String, Budget>>,
}

#[derive(Debug)]
struct Budget {
    requests: f64,
    tokens: f64,
    /// Tokens held by requests in flight (not yet spent, not free either).
    reserved: u64,
    at: Instant,
    in_flight: u32,
}

/// Why a request was refused, and when to try again.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub retry_after_secs: u64,
    pub message: String,
}

/// Why tokens could not be held for a request.
#[derive(Debug, PartialEq)]
pub enum Reservation {
    /// More than the key's whole minute: it would never fit.
    TooLarge { message: String },
    /// Not now.
    Later(Refusal),
}

/// An admitted request's place in its key's concurrency limit; released when dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    name: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limiter.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = state.get_mut(&self.name) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }
}

impl Limiter {
    /// Admits one request of `who` at `now`, or says why not. Requests are counted on
    /// admission; tokens are charged when the request ends ([`Limiter::charge`]), so a
    /// key with no token budget left is refused until it refills.
    pub fn admit(self: &Arc<Self>, who: &Identity, now: Instant) -> Result<Permit, Refusal> {
        let l = who.limits;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let b = state.entry(who.name.clone()).or_insert_with(|| Budget {
            requests: f64::from(l.requests_per_minute.unwrap_or(0)),
            tokens: l.tokens_per_minute.unwrap_or(0) as f64,
            reserved: 0,
            at: now,
            in_flight: 0,
        });
        refill(b, l, now);
        if let Some(max) = l.max_concurrent {
            if b.in_flight >= max {
                return Err(Refusal {
                    retry_after_secs: 1,
                    message: format!(
                        "Rate limit reached for key `{}`: at most {max} concurrent requests. Retry when one finishes.",
                        who.name
                    ),
                });
            }
        }
        if let Some(rpm) = l.requests_per_minute {
            if b.requests < 1.0 {
                let wait = (1.0 - b.requests) * 60.0 / f64::from(rpm);
                return Err(Refusal {
                    retry_after_secs: (wait.ceil() as u64).max(1),
                    message: format!(
                        "Rate limit reached for key `{}`: {rpm} requests per minute. Retry in {:.0} s.",
                        who.name,
                        wait.ceil().max(1.0)
                    ),
                });
            }
        }
        if let Some(tpm) = l.tokens_per_minute {
            let free = b.tokens - b.reserved as f64;
            if free <= 0.0 {
                let wait = (-free + 1.0) * 60.0 / tpm as f64;
                return Err(Refusal {
                    retry_after_secs: (wait.ceil() as u64).max(1),
                    message: format!(
                        "Rate limit reached for key `{}`: {tpm} tokens per minute. Retry in {:.0} s.",
                        who.name,
                        wait.ceil().max(1.0)
                    ),
                });
            }
        }
        if l.requests_per_minute.is_some() {
            b.requests -= 1.0;
        }
        b.in_flight += 1;
        Ok(Permit {
            limiter: self.clone(),
            name: who.name.clone(),
        })
    }

    /// Charges `tokens` (prompt + completion) to `who`'s budget.
    pub fn charge(&self, who: &Identity, tokens: u64, now: Instant) {
        self.settle(who, 0, tokens, now);
    }

    /// Holds `tokens` (the most an accepted request can use) of `who`'s token budget, or
    /// says why not: more than a whole minute's budget can never be held (`too_large`);
    /// more than is free now, retry when enough has accrued. Returns the tokens held (0
    /// for a key without a token limit), to pass to [`Limiter::settle`].
    pub fn reserve(&self, who: &Identity, tokens: u64, now: Instant) -> Result<u64, Reservation> {
        let Some(tpm) = who.limits.tokens_per_minute else {
            return Ok(0);
        };
        if tokens > tpm {
            return Err(Reservation::TooLarge {
                message: format!(
                    "This request may use up to {tokens} tokens but key `{}` may use {tpm} tokens per minute. Lower max_tokens or n.",
                    who.name
                ),
            });
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = state.get_mut(&who.name) else {
            // Not admitted by this limiter (never in practice): nothing to hold against.
            return Ok(0);
        };
        refill(b, who.limits, now);
        let free = b.tokens - b.reserved as f64;
        if free < tokens as f64 {
            let wait = (tokens as f64 - free) * 60.0 / tpm as f64;
            return Err(Reservation::Later(Refusal {
                retry_after_secs: (wait.ceil() as u64).max(1),
                message: format!(
                    "Rate limit reached for key `{}`: {tpm} tokens per minute, and this request may use up to {tokens} (prompt + max_tokens for each choice). Retry in {:.0} s or lower max_tokens.",
                    who.name,
                    wait.ceil().max(1.0)
                ),
            }));
        }
        b.reserved += tokens;
        Ok(tokens)
    }

    /// Ends a request that held `reserved` tokens and used `used`: the hold is let go
    /// and what was used is spent.
    pub fn settle(&self, who: &Identity, reserved: u64, used: u64, now: Instant) {
        if reserved == 0 && (who.limits.tokens_per_minute.is_none() || used == 0) {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = state.get_mut(&who.name) {
            refill(b, who.limits, now);
            b.reserved = b.reserved.saturating_sub(reserved);
            b.tokens -= used as f64;
        }
    }

    /// Requests of `name` in flight now.
    pub fn in_flight(&self, name: &str) -> u32 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.get(name).map_or(0, |b| b.in_flight)
    }
}

/// Adds what accrued since the last look, capped at one minute's worth (also when a reload
/// lowered the limit).
fn refill(b: &mut Budget, l: Limits, now: Instant) {
    let minutes = now.saturating_duration_since(b.at).as_secs_f64() / 60.0;
    b.at = b.at.max(now);
    if let Some(rpm) = l.requests_per_minute {
        let cap = f64::from(rpm);
        b.requests = (b.requests + minutes * cap).min(cap);
    }
    if let Some(tpm) = l.tokens_per_minute {
        let cap = tpm as f64;
        b.tokens = (b.tokens + minutes * cap).min(cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn identity(name: &str, limits: Limits) -> Identity {
        Identity {
            name: name.into(),
            models: any_model(),
            limits,
            revoked: false,
        }
    }

    #[test]
    fn add_list_revoke_round_trip() {
        let mut file = KeysFile::default();
        let key = file
            .add("alice", vec![], Limits::default(), "2026-11-28T00:00:00Z")
            .unwrap();
        assert!(key.starts_with("hk-") && key.len() == 51, "{key}");
        let limits = Limits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(1000),
            max_concurrent: Some(2),
        };
        let key_b = file
            .add("bob", vec!["m1".into()], limits, "2026-11-28T00:00:00Z")
            .unwrap();
        assert_ne!(key, key_b);
        let text = file.to_toml();
        assert!(!text.contains(&key) && !text.contains(&key_b), "{text}");
        assert!(text.contains(&hash_key(&key)));
        let back = KeysFile::parse(&text).unwrap();
        assert_eq!(back, file);

        assert!(KeyStore::new(Some(&KeysFile::default()), &[]).required());
        assert!(!KeyStore::new(None, &[]).required());
        let store = KeyStore::new(Some(&back), &[]);
        let Lookup::Valid(bob) = store.lookup(&key_b) else {
            panic!("bob's key is valid")
        };
        assert_eq!(bob.name, "bob");
        assert!(bob.may_use("m1") && !bob.may_use("m2"));
        assert_eq!(bob.limits, limits);
        assert!(matches!(store.lookup("hk-nope"), Lookup::Unknown));

        file.revoke("alice", "2026-11-28T01:00:00Z").unwrap();
        assert!(file.revoke("alice", "x").is_err());
        assert!(file.revoke("carol", "x").is_err());
        let store = KeyStore::new(Some(&file), &["plain".into()]);
        assert!(matches!(store.lookup(&key), Lookup::Revoked(_)));
        let Lookup::Valid(cli) = store.lookup("plain") else {
            panic!("plain keys are valid")
        };
        assert_eq!(cli.name, "cli-1");
        assert!(file.add("bob", vec![], Limits::default(), "x").is_err());
        assert!(file
            .add("bad name", vec![], Limits::default(), "x")
            .is_err());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let hash = "a".repeat(64);
        let cases = [
            ("[[key]]\nname = \"a\"\n".to_string(), "sha256"),
            (format!("[[key]]\nname = \"a\"\nsha256 = \"{}\"\n", "A".repeat(64)), "hex"),
            (format!("[[key]]\nname = \"a b\"\nsha256 = \"{hash}\"\n"), "letters"),
            (
                format!("[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\n[[key]]\nname = \"a\"\nsha256 = \"{}\"\n", "b".repeat(64)),
                "twice",
            ),
            (
                format!("[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\n[[key]]\nname = \"b\"\nsha256 = \"{hash}\"\n"),
                "twice",
            ),
            (format!("[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\nmodels = []\n"), "models"),
            (format!("[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\nmax_concurrent = 0\n"), "limit of 0"),
            (format!("[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\nrpm = 3\n"), "unknown field"),
            (format!("[[key]]\nname = \"a\"\nsha256 = \"{hash}\"\nrequests_per_minute = -1\n"), "requests_per_minute"),
            ("key = 3".to_string(), "invalid type"),
            ("[[key]\n".to_string(), "TOML"),
        ];
        for (text, want) in cases {
            let err = KeysFile::parse(&text).expect_err(&text).to_string();
            assert!(
                err.to_lowercase().contains(&want.to_lowercase())
                    || (want == "TOML" && !err.is_empty()),
                "{text:?}: {err}"
            );
        }
        assert_eq!(KeysFile::parse("").unwrap(), KeysFile::default());
    }

    #[test]
    fn write_is_private_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let mut file = KeysFile::default();
        file.add("a", vec![], Limits::default(), "t").unwrap();
        file.write(&path).unwrap();
        assert_eq!(KeysFile::read(&path).unwrap(), file);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = KeysFile::read(&dir.path().join("none.toml")).unwrap_err();
        assert!(err.to_string().contains("none.toml"), "{err}");
    }

    #[test]
    fn request_budget_refills() {
        let limiter = Arc::new(Limiter::default());
        let who = identity(
            "a",
            Limits {
                requests_per_minute: Some(2),
                ..Limits::default()
            },
        );
        let t0 = Instant::now();
        let p1 = limiter.admit(&who, t0).unwrap();
        let p2 = limiter.admit(&who, t0).unwrap();
        let refused = limiter.admit(&who, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs, 30);
        assert!(refused.message.contains("2 requests per minute"));
        drop((p1, p2));
        // Half a minute later one request has accrued, not two.
        let t1 = t0 + Duration::from_secs(30);
        let _p = limiter.admit(&who, t1).unwrap();
        assert!(limiter.admit(&who, t1).is_err());
        // Never more than a minute's worth, however long the key was idle.
        let t2 = t1 + Duration::from_secs(3600);
        let _a = limiter.admit(&who, t2).unwrap();
        let _b = limiter.admit(&who, t2).unwrap();
        assert!(limiter.admit(&who, t2).is_err());
    }

    #[test]
    fn token_budget_and_concurrency() {
        let limiter = Arc::new(Limiter::default());
        let who = identity(
            "t",
            Limits {
                tokens_per_minute: Some(600),
                max_concurrent: Some(1),
                ..Limits::default()
            },
        );
        let t0 = Instant::now();
        let p = limiter.admit(&who, t0).unwrap();
        let busy = limiter.admit(&who, t0).unwrap_err();
        assert!(busy.message.contains("1 concurrent"), "{busy:?}");
        assert_eq!(limiter.in_flight("t"), 1);
        drop(p);
        assert_eq!(limiter.in_flight("t"), 0);
        // 700 tokens spent of 600: 101 short, at 10 per second → 11 s.
        limiter.charge(&who, 700, t0);
        let r = limiter.admit(&who, t0).unwrap_err();
        assert_eq!(r.retry_after_secs, 11, "{r:?}");
        assert!(limiter.admit(&who, t0 + Duration::from_secs(11)).is_ok());
        // Other keys have budgets of their own.
        let other = identity("u", who.limits);
        assert!(limiter.admit(&other, t0).is_ok());
    }

    #[test]
    fn requests_hold_their_most_and_give_back_the_rest() {
        let limiter = Arc::new(Limiter::default());
        let who = identity(
            "r",
            Limits {
                tokens_per_minute: Some(600),
                ..Limits::default()
            },
        );
        let t0 = Instant::now();
        let _p = limiter.admit(&who, t0).unwrap();
        // Two requests of up to 250 tokens each fit in 600; a third does not, though
        // nothing has been spent yet: it would overshoot if all three ran to the end.
        assert_eq!(limiter.reserve(&who, 250, t0), Ok(250));
        assert_eq!(limiter.reserve(&who, 250, t0), Ok(250));
        let Err(Reservation::Later(r)) = limiter.reserve(&who, 250, t0) else {
            panic!("the third does not fit")
        };
        // 150 short at 10 tokens a second.
        assert_eq!(r.retry_after_secs, 15, "{r:?}");
        assert!(r.message.contains("600 tokens per minute"), "{r:?}");
        // The first used 50 of its 250: 200 come back, so the third fits now.
        limiter.settle(&who, 250, 50, t0);
        assert_eq!(limiter.reserve(&who, 250, t0), Ok(250));
        // Held 250 + 250, spent 50: 50 free.
        assert!(limiter.reserve(&who, 51, t0).is_err());
        assert_eq!(limiter.reserve(&who, 50, t0), Ok(50));
        // A new request is refused at the door while nothing is free.
        assert!(limiter.admit(&who, t0).is_err());
        // Both end having used all they held: 600 spent in all, nothing held.
        limiter.settle(&who, 250, 250, t0);
        limiter.settle(&who, 250, 250, t0);
        limiter.settle(&who, 50, 50, t0);
        assert!(limiter.reserve(&who, 1, t0).is_err());
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(limiter.reserve(&who, 600, t1), Ok(600));
    }

    #[test]
    fn a_request_larger_than_a_minute_is_refused_for_good() {
        let limiter = Arc::new(Limiter::default());
        let who = identity(
            "big",
            Limits {
                tokens_per_minute: Some(1000),
                ..Limits::default()
            },
        );
        let t0 = Instant::now();
        let _p = limiter.admit(&who, t0).unwrap();
        // n = 128, max_tokens = 8000: over a million tokens against 1000 a minute. Before
        // holds, it was admitted with a full budget and spent it a thousand times over.
        let Err(Reservation::TooLarge { message }) = limiter.reserve(&who, 128 * 8000, t0) else {
            panic!("too large")
        };
        assert!(message.contains("1024000") && message.contains("1000 tokens per minute"));
        // Nothing was held by the refusal.
        assert_eq!(limiter.reserve(&who, 1000, t0), Ok(1000));
        // Keys without a token limit hold nothing.
        let free = identity("free", Limits::default());
        assert_eq!(limiter.reserve(&free, 1 << 40, t0), Ok(0));
    }
}
