//! The audit log: one JSON line per request, append-only, hash-chained.
//!
//! Every line carries `seq` (0, 1, 2, … across the log's whole life) and `prev`, the
//! SHA-256 of the previous line's bytes (64 zeros before the first), so removing, editing
//! or reordering a line breaks the chain where it happened; [`verify`] finds the first
//! such place. Lines are written by one thread fed through a channel: a request hands its
//! record over and goes on, so writing never holds up token streaming. Rotation renames
//! the full file to `PATH.N` (N one more than the highest present) and the chain goes on
//! in a fresh `PATH`; a restart resumes the chain from the file's last line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use hearth_models::pin::hex;

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
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The writer's end of the chain.
struct Chain {
    next_seq: u64,
    prev: String,
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
        let chain = resume(&config.path).map_err(|e| format!("{name}: {e}"))?;
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

    /// Hands a record to the writer (which adds `seq` and `prev`); never waits for disk.
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
/// is empty or absent).
fn resume(path: &Path) -> std::io::Result<Chain> {
    let candidates =
        std::iter::once(path.to_path_buf()).chain(rotated(path)?.into_iter().rev().map(|(_, p)| p));
    for p in candidates {
        if let Some(line) = last_line(&p)? {
            let v: Value = serde_json::from_slice(&line).map_err(|_| {
                std::io::Error::other(format!(
                    "{}: the last line is not a JSON record (torn or edited); check it with `hearth audit verify`",
                    p.display()
                ))
            })?;
            let seq = v["seq"].as_u64().ok_or_else(|| {
                std::io::Error::other(format!("{}: the last line has no `seq`", p.display()))
            })?;
            return Ok(Chain {
                next_seq: seq + 1,
                prev: hex(&Sha256::digest(&line)),
            });
        }
    }
    Ok(Chain {
        next_seq: 0,
        prev: GENESIS.into(),
    })
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

fn writer(
    config: AuditConfig,
    file: File,
    mut chain: Chain,
    rx: mpsc::Receiver<Map<String, Value>>,
) {
    let name = config.path.display().to_string();
    let mut size = file.metadata().map_or(0, |m| m.len());
    let mut out = std::io::BufWriter::new(file);
    let mut unsynced = false;
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
            if let Err(e) = out.write_all(&line).and_then(|_| out.write_all(b"\n")) {
                tracing::error!("audit log {name}: cannot write: {e}");
            }
            size += line.len() as u64 + 1;
            unsynced = true;
            if config.fsync == Fsync::Always {
                sync(&mut out, &name);
                unsynced = false;
            }
            if config.max_bytes.is_some_and(|m| size >= m) {
                match rotate(&config.path, &mut out) {
                    Ok(()) => size = 0,
                    Err(e) => tracing::error!("audit log {name}: cannot rotate: {e}"),
                }
                unsynced = false;
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!("audit log {name}: cannot write: {e}");
        }
        if unsynced {
            if let Fsync::Every(d) = config.fsync {
                if last_sync.elapsed() >= d || !woke {
                    sync(&mut out, &name);
                    unsynced = false;
                    last_sync = Instant::now();
                }
            }
        }
    }
    if config.fsync != Fsync::Never {
        sync(&mut out, &name);
    } else {
        let _ = out.flush();
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

/// The record as one line: `seq` and `prev` first, then its fields.
fn chain_line(chain: &mut Chain, record: Map<String, Value>) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("seq".into(), chain.next_seq.into());
    fields.insert("prev".into(), chain.prev.clone().into());
    for (k, v) in record {
        if k != "seq" && k != "prev" {
            fields.insert(k, v);
        }
    }
    let line = serde_json::to_vec(&Value::Object(fields)).expect("JSON values serialize");
    chain.next_seq += 1;
    chain.prev = hex(&Sha256::digest(&line));
    line
}

/// What a verified log holds.
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub lines: u64,
    pub first_seq: u64,
    pub last_seq: Option<u64>,
    /// SHA-256 of the last line: record it elsewhere to anchor the chain.
    pub head: String,
    /// The files in chain order.
    pub files: Vec<PathBuf>,
}

/// The first place where the chain breaks.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{file}:{line}: {problem}")]
pub struct Broken {
    pub file: String,
    pub line: u64,
    pub problem: String,
}

/// Checks the chain over `files` (in any order: they are put in order by their first
/// `seq`). With `partial`, the chain may start after seq 0 (older files were removed);
/// otherwise a missing start is a break.
pub fn verify(files: &[PathBuf], partial: bool) -> Result<Verified, Broken> {
    // (first seq, path) of each file that has lines.
    let mut ordered = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let file = File::open(f).map_err(|e| Broken {
            file: name.clone(),
            line: 0,
            problem: format!("cannot read: {e}"),
        })?;
        let mut first = String::new();
        BufReader::new(file)
            .read_line(&mut first)
            .map_err(|e| Broken {
                file: name.clone(),
                line: 1,
                problem: format!("cannot read: {e}"),
            })?;
        if first.trim().is_empty() {
            continue;
        }
        let seq = serde_json::from_str::<Value>(first.trim_end_matches('\n'))
            .ok()
            .and_then(|v| v["seq"].as_u64())
            .ok_or_else(|| Broken {
                file: name.clone(),
                line: 1,
                problem: "not an audit record (no JSON object with `seq`)".into(),
            })?;
        ordered.push((seq, f.clone()));
    }
    ordered.sort();
    let mut expected: Option<(u64, String)> = None;
    let mut lines = 0;
    let first_seq = ordered.first().map_or(0, |(s, _)| *s);
    if first_seq != 0 && !partial {
        return Err(Broken {
            file: ordered[0].1.display().to_string(),
            line: 1,
            problem: format!(
                "the chain starts at seq {first_seq}: lines 0 to {} are missing (give the older files, or --partial)",
                first_seq - 1
            ),
        });
    }
    let mut last_seq = None;
    for (_, path) in &ordered {
        let name = path.display().to_string();
        let mut reader = BufReader::new(File::open(path).map_err(|e| Broken {
            file: name.clone(),
            line: 0,
            problem: format!("cannot read: {e}"),
        })?);
        let mut n = 0u64;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let read = reader.read_until(b'\n', &mut buf).map_err(|e| Broken {
                file: name.clone(),
                line: n + 1,
                problem: format!("cannot read: {e}"),
            })?;
            if read == 0 {
                break;
            }
            n += 1;
            let broken = |problem: String| Broken {
                file: name.clone(),
                line: n,
                problem,
            };
            if buf.last() != Some(&b'\n') {
                return Err(broken("the last line is cut short (no newline)".into()));
            }
            let line = &buf[..buf.len() - 1];
            let v: Value = serde_json::from_slice(line)
                .map_err(|e| broken(format!("not a JSON record: {e}")))?;
            let (Some(seq), Some(prev)) = (v["seq"].as_u64(), v["prev"].as_str()) else {
                return Err(broken("no `seq` or `prev`".into()));
            };
            match &expected {
                None => {
                    if seq == 0 && prev != GENESIS {
                        return Err(broken("the first line's `prev` is not all zeros".into()));
                    }
                }
                Some((want_seq, want_prev)) => {
                    if seq != *want_seq {
                        return Err(broken(if seq > *want_seq {
                            format!(
                                "seq {seq} follows seq {}: {} line(s) missing",
                                want_seq - 1,
                                seq - want_seq
                            )
                        } else {
                            format!(
                                "seq {seq} follows seq {}: out of order or repeated",
                                want_seq - 1
                            )
                        }));
                    }
                    if prev != want_prev {
                        return Err(broken(
                            "`prev` is not the hash of the line before: that line was edited, or lines were removed or inserted".into(),
                        ));
                    }
                }
            }
            expected = Some((seq + 1, hex(&Sha256::digest(line))));
            last_seq = Some(seq);
            lines += 1;
        }
    }
    Ok(Verified {
        lines,
        first_seq,
        last_seq,
        head: expected.map_or_else(|| GENESIS.to_owned(), |(_, h)| h),
        files: ordered.into_iter().map(|(_, p)| p).collect(),
    })
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
        }
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
