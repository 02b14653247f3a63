//! The audit log: one JSON line per request, append-only, hash-chained.
//!
//! Every line carries `seq` (0, 1, 2, … across the log's whole life) and `prev`, the link
//! to the previous line (64 zeros before the first), so removing, editing or reordering a
//! line breaks the chain where it happened; [`verify`] finds the first such place. Lines
//! are written by one thread fed through a channel: a request hands its record over and
//! goes on, so writing never holds up token streaming. Rotation renames the full file to
//! `PATH.N` (N one more than the highest present) and the chain goes on in a fresh
//! `PATH`; a restart resumes the chain from the file's last line.
//!
//! A plain chain links by SHA-256 of the previous line: anyone who can write the file
//! can rebuild it. With a chain key ([`seal::ChainKey`]) each line also ends in `mac`,
//! an HMAC-SHA256 of the line before that field, and the next line's `prev` is that mac:
//! only the key holder can edit, insert or rebuild lines. With a signing key, the writer
//! adds signed `checkpoint` lines every so many lines and at close, and keeps the latest
//! in `PATH.checkpoint`, so a log cut short after a checkpoint is seen as such.
//!
//! A request leaves two lines: `"event":"started"` when it is admitted and
//! `"event":"finished"` (the full record) when it is over, with the same `id`; a request
//! that died with the process has only the first, and [`verify`] lists it.

pub mod seal;
mod verify;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use hearth_models::pin::hex;
pub use seal::{ChainKey, PublicKey, SealError, Sidecar, SigningKey};
pub use verify::{verify, verify_with, Broken, Check, Unfinished, Verified};

/// When written lines are forced to disk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fsync {
    /// After every line: nothing acknowledged is lost in a power cut.
    Always,
    /// At most this long after a line is written.
    Every(Duration),
    /// When the operating system decides.
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => {
                let ms = s
                    .strip_suffix("ms")
                    .and_then(|n| n.parse::<u64>().ok())
                    .or_else(|| {
                        s.strip_suffix('s')
                            .and_then(|n| n.parse::<u64>().ok())
                            .map(|n| n * 1000)
                    });
                match ms {
                    Some(ms) if ms > 0 => Ok(Self::Every(Duration::from_millis(ms))),
                    _ => Err(format!(
                        "`{s}` is not an fsync policy: always, never, or an interval such as 1s or 200ms"
                    )),
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub fsync: Fsync,
    /// Rotate once the file reaches this size; `None` = never.
    pub max_bytes: Option<u64>,
    /// Record prompt and completion text too.
    pub content: bool,
    /// Key the chain: every line gets an HMAC-SHA256 `mac`.
    pub chain_key: Option<ChainKey>,
    /// Write signed checkpoints.
    pub checkpoints: Option<Checkpoints>,
}

/// Signed checkpoints: one after every `every` lines, and one at close.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    pub key: Arc<SigningKey>,
    pub every: u64,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What `event` a line is.
const STARTED: &str = "started";
const FINISHED: &str = "finished";
const CHECKPOINT: &str = "checkpoint";

/// The writer's end of the chain.
struct Chain {
    next_seq: u64,
    prev: String,
    key: Option<ChainKey>,
    /// Lines written since the last checkpoint.
    since_checkpoint: u64,
}

/// A running audit log; records go to its writer thread.
pub struct AuditLog {
    tx: Mutex<Option<mpsc::Sender<Map<String, Value>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub content: bool,
}

impl AuditLog {
    /// Opens (or creates) the log, resumes its chain, and starts the writer.
    pub fn open(config: AuditConfig) -> Result<Self, String> {
        let name = config.path.display().to_string();
        let chain =
            resume(&config.path, config.chain_key.as_ref()).map_err(|e| format!("{name}: {e}"))?;
        let file = open_append(&config.path).map_err(|e| format!("{name}: {e}"))?;
        let (tx, rx) = mpsc::channel::<Map<String, Value>>();
        let content = config.content;
        let thread = std::thread::Builder::new()
            .name("hearth-audit".into())
            .spawn(move || writer(config, file, chain, rx))
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            content,
        })
    }

    /// Hands a record to the writer (which adds `seq`, `prev` and, keyed, `chain` and
    /// `mac`); never waits for disk.
    pub fn record(&self, fields: Map<String, Value>) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(fields);
        }
    }

    /// Writes out what is queued, syncs, and stops the writer. Later records are dropped.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Where the chain stands at the end of `path` (or of its newest rotated file when `path`
/// is empty or absent). A keyed log continues only under the key that wrote it.
fn resume(path: &Path, key: Option<&ChainKey>) -> std::io::Result<Chain> {
    let candidates =
        std::iter::once(path.to_path_buf()).chain(rotated(path)?.into_iter().rev().map(|(_, p)| p));
    for p in candidates {
        if let Some(line) = last_line(&p)? {
            let fail = |m: &str| std::io::Error::other(format!("{}: {m}", p.display()));
            let v: Value = serde_json::from_slice(&line).map_err(|_| {
                fail("the last line is not a JSON record (torn or edited); check it with `hearth audit verify`")
            })?;
            let seq = v["seq"]
                .as_u64()
                .ok_or_else(|| fail("the last line has no `seq`"))?;
            let prev = if keyed(&v) {
                let key = key.ok_or_else(|| {
                    fail("the log is HMAC-chained: give its chain key (--audit-key-file) to continue it")
                })?;
                match split_mac(&line) {
                    Some((body, mac)) if key.link(&body) == mac => mac.to_owned(),
                    _ => return Err(fail(
                        "the last line's mac does not match this chain key (another key, or the line was edited); check it with `hearth audit verify --key-file`",
                    )),
                }
            } else {
                hex(&Sha256::digest(&line))
            };
            return Ok(Chain {
                next_seq: seq + 1,
                prev,
                key: key.cloned(),
                since_checkpoint: u64::from(v["event"] != CHECKPOINT),
            });
        }
    }
    Ok(Chain {
        next_seq: 0,
        prev: GENESIS.into(),
        key: key.cloned(),
        since_checkpoint: 0,
    })
}

/// Whether a line says it is HMAC-chained.
fn keyed(v: &Value) -> bool {
    v["chain"].as_str() == Some(ChainKey::SCHEME)
}

/// A keyed line ends in `,"mac":"<64 hex>"}`: the line as it was MACed (that field
/// left out), and the mac.
fn split_mac(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    const TAIL: usize = r#","mac":""#.len() + 64 + r#""}"#.len();
    let cut = line.len().checked_sub(TAIL)?;
    let (body, tail) = line.split_at(cut);
    let mac = tail
        .strip_prefix(br#","mac":""#)?
        .strip_suffix(br#""}"#)
        .and_then(|m| std::str::from_utf8(m).ok())
        .filter(|m| m.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let mut unmaced = body.to_vec();
    unmaced.push(b'}');
    Some((unmaced, mac))
}

/// The link the next line's `prev` must hold: a keyed line's mac, else the SHA-256 of
/// the line.
fn link_of(line: &[u8], v: &Value) -> String {
    match (keyed(v), split_mac(line)) {
        (true, Some((_, mac))) => mac.to_owned(),
        _ => hex(&Sha256::digest(line)),
    }
}

/// `PATH.N` files beside `path`, by N.
fn rotated(path: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(base) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix(&base)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The last non-empty line of a file, without its newline; `None` when there is none.
fn last_line(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Read backwards in growing chunks until the line's start is in view.
    let mut chunk = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(&mut f)
            .take(len - start)
            .read_to_end(&mut buf)?;
        let end = buf.iter().rposition(|&b| b != b'\n').map(|i| i + 1);
        let Some(end) = end else {
            if start == 0 {
                return Ok(None);
            }
            chunk *= 4;
            continue;
        };
        match buf[..end].iter().rposition(|&b| b == b'\n') {
            Some(nl) => return Ok(Some(buf[nl + 1..end].to_vec())),
            None if start == 0 => return Ok(Some(buf[..end].to_vec())),
            None => chunk *= 4,
        }
    }
}

/// The open file and what has gone into it.
struct Sink {
    out: std::io::BufWriter<File>,
    size: u64,
    unsynced: bool,
}

fn writer(
    config: AuditConfig,
    file: File,
    mut chain: Chain,
    rx: mpsc::Receiver<Map<String, Value>>,
) {
    let name = config.path.display().to_string();
    let size = file.metadata().map_or(0, |m| m.len());
    let mut sink = Sink {
        out: std::io::BufWriter::new(file),
        size,
        unsynced: false,
    };
    let mut last_sync = Instant::now();
    let tick = match config.fsync {
        Fsync::Every(d) => d,
        _ => Duration::from_secs(3600),
    };
    loop {
        let first = match rx.recv_timeout(tick) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let woke = first.is_some();
        // Whatever else is queued goes out in the same write.
        for record in first.into_iter().chain(rx.try_iter()) {
            let line = chain_line(&mut chain, record);
            emit(&config, &mut sink, &line, &name);
            if let Some(c) = &config.checkpoints {
                if chain.since_checkpoint >= c.every {
                    checkpoint(&config, c, &mut chain, &mut sink, &name);
                }
            }
        }
        if let Err(e) = sink.out.flush() {
            tracing::error!("audit log {name}: cannot write: {e}");
        }
        if sink.unsynced {
            if let Fsync::Every(d) = config.fsync {
                if last_sync.elapsed() >= d || !woke {
                    sync(&mut sink.out, &name);
                    sink.unsynced = false;
                    last_sync = Instant::now();
                }
            }
        }
    }
    // A clean close seals the log: its last line is a checkpoint.
    if let Some(c) = &config.checkpoints {
        if chain.since_checkpoint > 0 {
            checkpoint(&config, c, &mut chain, &mut sink, &name);
        }
    }
    if config.fsync != Fsync::Never {
        sync(&mut sink.out, &name);
    } else {
        let _ = sink.out.flush();
    }
}

/// Writes one line; syncs and rotates as configured.
fn emit(config: &AuditConfig, sink: &mut Sink, line: &[u8], name: &str) {
    if let Err(e) = sink
        .out
        .write_all(line)
        .and_then(|_| sink.out.write_all(b"\n"))
    {
        tracing::error!("audit log {name}: cannot write: {e}");
    }
    sink.size += line.len() as u64 + 1;
    sink.unsynced = true;
    if config.fsync == Fsync::Always {
        sync(&mut sink.out, name);
        sink.unsynced = false;
    }
    if config.max_bytes.is_some_and(|m| sink.size >= m) {
        match rotate(&config.path, &mut sink.out) {
            Ok(()) => sink.size = 0,
            Err(e) => tracing::error!("audit log {name}: cannot rotate: {e}"),
        }
        sink.unsynced = false;
    }
}

/// Writes a signed checkpoint line, syncs the log, then replaces the sidecar (which so
/// never claims more than the disk holds).
fn checkpoint(
    config: &AuditConfig,
    c: &Checkpoints,
    chain: &mut Chain,
    sink: &mut Sink,
    name: &str,
) {
    let time = hearth_models::clock::rfc3339_millis(SystemTime::now());
    let sidecar = Sidecar {
        seq: chain.next_seq,
        head: chain.prev.clone(),
        signature: c.key.sign(chain.next_seq, &chain.prev, &time),
        time,
    };
    let mut record = Map::new();
    record.insert("event".into(), CHECKPOINT.into());
    record.insert("time".into(), sidecar.time.clone().into());
    record.insert("head".into(), sidecar.head.clone().into());
    record.insert("signature".into(), sidecar.signature.clone().into());
    let line = chain_line(chain, record);
    chain.since_checkpoint = 0;
    emit(config, sink, &line, name);
    sync(&mut sink.out, name);
    sink.unsynced = false;
    if let Err(e) = sidecar.write(&Sidecar::path_for(&config.path)) {
        tracing::error!("audit log {name}: cannot write its checkpoint sidecar: {e}");
    }
}

fn sync(out: &mut std::io::BufWriter<File>, name: &str) {
    if let Err(e) = out.flush().and_then(|_| out.get_ref().sync_data()) {
        tracing::error!("audit log {name}: cannot sync: {e}");
    }
}

/// Closes the full file as `PATH.N` and continues in a new `PATH`.
fn rotate(path: &Path, out: &mut std::io::BufWriter<File>) -> std::io::Result<()> {
    out.flush()?;
    out.get_ref().sync_all()?;
    let n = rotated(path)?.last().map_or(1, |(n, _)| n + 1);
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".{n}"));
    std::fs::rename(path, &target)?;
    *out = std::io::BufWriter::new(open_append(path)?);
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The record as one line: `seq`, `prev` (and `chain` when keyed), its fields, and
/// last, when keyed, `mac`.
fn chain_line(chain: &mut Chain, record: Map<String, Value>) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("seq".into(), chain.next_seq.into());
    fields.insert("prev".into(), chain.prev.clone().into());
    if chain.key.is_some() {
        fields.insert("chain".into(), ChainKey::SCHEME.into());
    }
    for (k, v) in record {
        if !matches!(k.as_str(), "seq" | "prev" | "chain" | "mac") {
            fields.insert(k, v);
        }
    }
    let mut line = serde_json::to_vec(&Value::Object(fields)).expect("JSON values serialize");
    chain.prev = match &chain.key {
        Some(key) => {
            let mac = key.link(&line);
            line.pop(); // the closing brace
            line.extend_from_slice(format!(r#","mac":"{mac}"}}"#).as_bytes());
            mac
        }
        None => hex(&Sha256::digest(&line)),
    };
    chain.next_seq += 1;
    chain.since_checkpoint += 1;
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(i: u64) -> Map<String, Value> {
        let Value::Object(m) = json!({"endpoint": "/v1/completions", "i": i}) else {
            unreachable!()
        };
        m
    }

    fn config(path: &Path, max_bytes: Option<u64>) -> AuditConfig {
        AuditConfig {
            path: path.to_path_buf(),
            fsync: Fsync::Every(Duration::from_millis(50)),
            max_bytes,
            content: false,
            chain_key: None,
            checkpoints: None,
        }
    }

    fn keyed(path: &Path, key: &ChainKey) -> AuditConfig {
        AuditConfig {
            chain_key: Some(key.clone()),
            ..config(path, None)
        }
    }

    fn write(config: AuditConfig, records: impl IntoIterator<Item = Map<String, Value>>) {
        let log = AuditLog::open(config).unwrap();
        for r in records {
            log.record(r);
        }
        log.close();
    }

    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn joined(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn a_keyed_chain_cannot_be_rebuilt_or_edited_without_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        let key = ChainKey::from_secret(&[7; 32]);
        let with_key = Check {
            key: Some(&key),
            ..Check::default()
        };
        write(keyed(&path, &key), (0..5).map(rec));
        let good = lines_of(&path);
        let v = verify_with(std::slice::from_ref(&path), with_key).unwrap();
        assert_eq!((v.lines, v.keyed_from), (5, Some(0)));
        assert!(good.iter().all(|l| l.contains(r#""chain":"hmac-sha256""#)));
        // Without the key a keyed log does not pass.
        let e = verify(std::slice::from_ref(&path), false).unwrap_err();
        assert!(e.problem.contains("--key-file"), "{e}");
        let check = |lines: &[String]| {
            std::fs::write(&path, joined(lines)).unwrap();
            verify_with(std::slice::from_ref(&path), with_key)
        };
        // The last line edited: its own mac gives it away.
        let mut edited = good.clone();
        edited[4] = edited[4].replace(r#""i":4"#, r#""i":9"#);
        let e = check(&edited).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.problem.contains("mac"), "{e}");
        // Rebuilt from line 2 on with another key, or as a plain chain: both fail.
        let rebuilt = dir.path().join("rebuilt.log");
        std::fs::write(&rebuilt, joined(&good[..2])).unwrap();
        let forged = ChainKey::from_secret(&[8; 32]);
        let mut chain = resume(&rebuilt, Some(&key)).unwrap();
        chain.key = Some(forged);
        let mut lines = good[..2].to_vec();
        for i in 2..5 {
            lines.push(String::from_utf8(chain_line(&mut chain, rec(i + 10))).unwrap());
        }
        assert_eq!(check(&lines).unwrap_err().line, 3);
        let mut chain = resume(&rebuilt, Some(&key)).unwrap();
        chain.key = None;
        let mut lines = good[..2].to_vec();
        for i in 2..5 {
            lines.push(String::from_utf8(chain_line(&mut chain, rec(i + 10))).unwrap());
        }
        let e = check(&lines).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.problem.contains("not HMAC-chained"), "{e}");
        // A whole plain chain, given the key, does not pass either.
        let plain = dir.path().join("plain.log");
        write(config(&plain, None), (0..3).map(rec));
        let e = verify_with(std::slice::from_ref(&plain), with_key).unwrap_err();
        assert!(e.problem.contains("not HMAC-chained"), "{e}");
        // The server goes on only under the key that wrote the log.
        std::fs::write(&path, joined(&good)).unwrap();
        let e = AuditLog::open(config(&path, None)).err().unwrap();
        assert!(e.contains("--audit-key-file"), "{e}");
        let e = AuditLog::open(keyed(&path, &ChainKey::from_secret(&[9; 32])))
            .err()
            .unwrap();
        assert!(e.contains("does not match"), "{e}");
        write(keyed(&path, &key), (5..7).map(rec));
        assert_eq!(
            verify_with(std::slice::from_ref(&path), with_key)
                .unwrap()
                .lines,
            7
        );
        // A plain log may become keyed; the key holder checks both parts.
        write(keyed(&plain, &key), (3..5).map(rec));
        let v = verify_with(std::slice::from_ref(&plain), with_key).unwrap();
        assert_eq!((v.lines, v.keyed_from), (5, Some(3)));
    }

    #[test]
    fn checkpoints_are_signed_and_the_sidecar_finds_a_cut_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let (private, public) = SigningKey::generate(&dir.path().join("sig")).unwrap();
        let signing = Arc::new(SigningKey::read(&private).unwrap());
        let pk = PublicKey::read(&public).unwrap();
        let key = ChainKey::from_secret(&[1; 32]);
        let cfg = AuditConfig {
            checkpoints: Some(Checkpoints {
                key: signing,
                every: 3,
            }),
            ..keyed(&path, &key)
        };
        // r0 r1 r2 C3 r4 r5 r6 C7 r8 C9 (the last at close).
        write(cfg.clone(), (0..7).map(rec));
        let good = lines_of(&path);
        assert_eq!(good.len(), 10);
        let full = Check {
            key: Some(&key),
            public_key: Some(&pk),
            partial: false,
        };
        let files = [path.clone()];
        let v = verify_with(&files, full).unwrap();
        assert_eq!(v.checkpoints, 3);
        assert_eq!(v.last_checkpoint.as_ref().unwrap().0, 9);
        assert!(v.signed);
        let sidecar = Sidecar::path_for(&path);
        assert_eq!(v.sidecar.as_ref().unwrap().0, sidecar);
        assert_eq!(v.sidecar.as_ref().unwrap().1.seq, 9);
        // A sidecar given among the files is taken as the sidecar.
        assert!(verify_with(&[path.clone(), sidecar.clone()], full).is_ok());

        // The tail cut, with or without the last checkpoint: the sidecar knows.
        for keep in [9, 7, 4] {
            std::fs::write(&path, joined(&good[..keep])).unwrap();
            let e = verify_with(&files, full).unwrap_err();
            assert!(e.problem.contains("log truncated"), "{keep}: {e}");
            assert!(e.problem.contains("seq 9"), "{e}");
        }
        // Without the sidecar, a cut right after a checkpoint is what it cannot see.
        let saved = std::fs::read(&sidecar).unwrap();
        std::fs::remove_file(&sidecar).unwrap();
        std::fs::write(&path, joined(&good[..8])).unwrap();
        let v = verify_with(&files, full).unwrap();
        assert_eq!(v.last_checkpoint.unwrap().0, 7);
        assert_eq!(v.sidecar, None);
        std::fs::write(&sidecar, &saved).unwrap();

        // Another public key, or a forged sidecar, fails.
        std::fs::write(&path, joined(&good)).unwrap();
        let (_, other) = SigningKey::generate(&dir.path().join("other")).unwrap();
        let other = PublicKey::read(&other).unwrap();
        let e = verify_with(
            &files,
            Check {
                public_key: Some(&other),
                ..full
            },
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.problem.contains("signature"), "{e}");
        let mut forged: Sidecar = serde_json::from_slice(&saved).unwrap();
        forged.head = "ab".repeat(32);
        forged.write(&sidecar).unwrap();
        assert!(verify_with(&files, full)
            .unwrap_err()
            .problem
            .contains("signature"));
        std::fs::write(&sidecar, &saved).unwrap();

        // Unkeyed but signed: an edited signature fails at its own line; a chain
        // rebuilt without checkpoints has none to show.
        let plain = dir.path().join("p.log");
        let cfg = AuditConfig {
            chain_key: None,
            path: plain.clone(),
            ..cfg
        };
        write(cfg, (0..4).map(rec));
        let pk_only = Check {
            public_key: Some(&pk),
            ..Check::default()
        };
        let plain_files = [plain.clone()];
        assert_eq!(verify_with(&plain_files, pk_only).unwrap().checkpoints, 2);
        let lines = lines_of(&plain);
        let mut bad = lines.clone();
        let sig_at = bad[3].find(r#""signature":""#).unwrap() + 13;
        let flipped = if &bad[3][sig_at..sig_at + 1] == "0" {
            "1"
        } else {
            "0"
        };
        bad[3].replace_range(sig_at..sig_at + 1, flipped);
        std::fs::write(&plain, joined(&bad)).unwrap();
        let e = verify_with(&plain_files, pk_only).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.problem.contains("signature"), "{e}");
        std::fs::remove_file(Sidecar::path_for(&plain)).unwrap();
        std::fs::write(&plain, "").unwrap();
        write(config(&plain, None), (0..3).map(rec));
        let e = verify_with(&plain_files, pk_only).unwrap_err();
        assert!(e.problem.contains("no signed checkpoint"), "{e}");
    }

    #[test]
    fn started_requests_that_never_finished_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let line = |event: &str, id: &str| {
            let Value::Object(m) =
                json!({"event": event, "id": id, "time": "t", "endpoint": "/v1/x"})
            else {
                unreachable!()
            };
            m
        };
        write(
            config(&path, None),
            [
                line("started", "a"),
                line("started", "b"),
                line("finished", "a"),
                line("started", "c"),
                line("finished", "c"),
                line("started", "d"),
                // A refusal is only finished.
                line("finished", "e"),
            ],
        );
        let v = verify(std::slice::from_ref(&path), false).unwrap();
        let ids: Vec<(&str, u64)> = v
            .unfinished
            .iter()
            .map(|u| (u.id.as_str(), u.seq))
            .collect();
        assert_eq!(ids, [("b", 1), ("d", 5)]);
        assert_eq!(v.unfinished[0].endpoint, "/v1/x");
    }

    fn all_files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    #[test]
    fn chain_survives_restart_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(config(&path, Some(600))).unwrap();
        for i in 0..10 {
            log.record(rec(i));
        }
        log.close();
        // A restart continues the chain.
        let log = AuditLog::open(config(&path, Some(600))).unwrap();
        for i in 10..25 {
            log.record(rec(i));
        }
        drop(log);
        let files = all_files(dir.path());
        assert!(files.len() >= 3, "rotated: {files:?}");
        let v = verify(&files, false).unwrap();
        assert_eq!((v.lines, v.first_seq, v.last_seq), (25, 0, Some(24)));
        assert_eq!(v.files.last().unwrap(), &path);
        // Every record is there, in order, once.
        let mut seen = Vec::new();
        for f in &v.files {
            for l in std::fs::read_to_string(f).unwrap().lines() {
                let v: Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["seq"], v["i"]);
                seen.push(v["i"].as_u64().unwrap());
            }
        }
        assert_eq!(seen, (0..25).collect::<Vec<_>>());
        // Without the oldest file the chain start is missing, unless --partial.
        let newer: Vec<PathBuf> = v.files[1..].to_vec();
        let err = verify(&newer, false).unwrap_err();
        assert!(err.problem.contains("missing"), "{err}");
        let p = verify(&newer, true).unwrap();
        assert_eq!(p.head, v.head);
    }

    #[test]
    fn tampering_is_found_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let log = AuditLog::open(config(&path, None)).unwrap();
        for i in 0..6 {
            log.record(rec(i));
        }
        drop(log);
        let good = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        let check = |text: String| {
            std::fs::write(&path, text).unwrap();
            verify(std::slice::from_ref(&path), false)
        };
        assert_eq!(check(good.clone()).unwrap().lines, 6);
        // An edited line breaks the link from the next one.
        let edited = good.replace("\"i\":2", "\"i\":7");
        let e = check(edited).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        // A removed line: the seq jumps.
        let removed: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let e = check(removed).unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.problem.contains("1 line(s) missing"), "{e}");
        // Swapped lines, a torn last line, garbage.
        let swapped = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[1]);
        assert_eq!(check(swapped).unwrap_err().line, 2);
        let torn = format!("{}\n{}", lines[0], &lines[1][..10]);
        assert!(check(torn).unwrap_err().problem.contains("cut short"));
        let e = check(format!("{}\nhello\n", lines[0])).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.problem.contains("JSON"));
        // A first line whose prev is not the genesis.
        let forged = lines[1].replace("\"seq\":1", "\"seq\":0");
        assert!(check(format!("{forged}\n"))
            .unwrap_err()
            .problem
            .contains("zeros"));
    }

    #[test]
    fn torn_log_refuses_to_resume_blindly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        std::fs::write(&path, "{\"seq\":0,\"prev\":\"00\"}\n{\"seq\":1,\"pr").unwrap();
        let err = AuditLog::open(config(&path, None)).err().unwrap();
        assert!(err.contains("t.log") && err.contains("verify"), "{err}");
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!("always".parse(), Ok(Fsync::Always));
        assert_eq!("never".parse(), Ok(Fsync::Never));
        assert_eq!("1s".parse(), Ok(Fsync::Every(Duration::from_secs(1))));
        assert_eq!(
            "250ms".parse(),
            Ok(Fsync::Every(Duration::from_millis(250)))
        );
        assert!("0s".parse::<Fsync>().is_err());
        assert!("sometimes".parse::<Fsync>().is_err());
    }

    #[test]
    fn long_last_lines_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.log");
        let big = "x".repeat(200_000);
        std::fs::write(&path, format!("a\n{big}\n\n")).unwrap();
        assert_eq!(last_line(&path).unwrap().unwrap().len(), 200_000);
        std::fs::write(&path, "only").unwrap();
        assert_eq!(last_line(&path).unwrap().unwrap(), b"only");
        std::fs::write(&path, "\n\n").unwrap();
        assert_eq!(last_line(&path).unwrap(), None);
    }
}
