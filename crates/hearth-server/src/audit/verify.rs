//! Checking an audit log: the links from line to line, each keyed line's mac, each
//! checkpoint's signature, the log against its checkpoint sidecar; and the requests
//! that started and never finished.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufRead;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    keyed, link_of, split_mac, ChainKey, PublicKey, Sidecar, CHECKPOINT, FINISHED, GENESIS, STARTED,
};

/// What a verified log holds.
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub lines: u64,
    pub first_seq: u64,
    pub last_seq: Option<u64>,
    /// The last line's link (its mac when keyed, else its SHA-256): record it elsewhere
    /// to anchor the chain.
    pub head: String,
    /// The files in chain order.
    pub files: Vec<PathBuf>,
    /// The seq from which lines are HMAC-chained (their macs checked with the key).
    pub keyed_from: Option<u64>,
    /// Checkpoint lines seen.
    pub checkpoints: u64,
    /// The last checkpoint's seq and time.
    pub last_checkpoint: Option<(u64, String)>,
    /// Whether the checkpoints' signatures were checked (a public key was given).
    pub signed: bool,
    /// The checkpoint sidecar the log was held against.
    pub sidecar: Option<(PathBuf, Sidecar)>,
    /// Requests with a `started` line and no `finished` line, in log order.
    pub unfinished: Vec<Unfinished>,
}

/// A request that was admitted and never finished: the process died (or is still
/// serving it).
#[derive(Debug, PartialEq)]
pub struct Unfinished {
    pub id: String,
    pub seq: u64,
    pub time: String,
    pub endpoint: String,
}

/// The first place where the chain breaks.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{file}:{line}: {problem}")]
pub struct Broken {
    pub file: String,
    pub line: u64,
    pub problem: String,
}

/// What [`verify_with`] checks beyond the links.
#[derive(Clone, Copy, Debug, Default)]
pub struct Check<'a> {
    /// The chain may start after seq 0 (older files were removed); otherwise a missing
    /// start is a break.
    pub partial: bool,
    /// The chain key: every keyed line's mac is checked, and the log must end keyed.
    /// Without it a keyed line is a break (its mac cannot be checked).
    pub key: Option<&'a ChainKey>,
    /// Checks each checkpoint's signature (and the sidecar's); the log must hold one.
    pub public_key: Option<&'a PublicKey>,
}

/// Checks the chain over `files` (in any order: they are put in order by their first
/// `seq`). With `partial`, the chain may start after seq 0.
pub fn verify(files: &[PathBuf], partial: bool) -> Result<Verified, Broken> {
    verify_with(
        files,
        Check {
            partial,
            ..Check::default()
        },
    )
}

/// The walk along the chain, line by line.
struct Walk<'a> {
    check: Check<'a>,
    /// (seq, link) the next line must carry.
    expected: Option<(u64, String)>,
    keyed_from: Option<u64>,
    checkpoints: u64,
    last_checkpoint: Option<(u64, String)>,
    /// seq -> (head, signature) of every checkpoint line.
    sealed: HashMap<u64, (String, String)>,
    /// Started requests not yet finished, by id: (seq, time, endpoint).
    open: HashMap<String, (u64, String, String)>,
}

impl Walk<'_> {
    fn line(&mut self, line: &[u8]) -> Result<(), String> {
        let v: Value =
            serde_json::from_slice(line).map_err(|e| format!("not a JSON record: {e}"))?;
        let (Some(seq), Some(prev)) = (v["seq"].as_u64(), v["prev"].as_str()) else {
            return Err("no `seq` or `prev`".into());
        };
        match &self.expected {
            None => {
                if seq == 0 && prev != GENESIS {
                    return Err("the first line's `prev` is not all zeros".into());
                }
            }
            Some((want_seq, want_prev)) => {
                if seq != *want_seq {
                    return Err(if seq > *want_seq {
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
                    });
                }
                if prev != want_prev {
                    return Err("`prev` is not the link to the line before: that line was edited, or lines were removed or inserted".into());
                }
            }
        }
        if keyed(&v) {
            let Some(key) = self.check.key else {
                return Err(format!(
                    "the log is HMAC-chained ({}) from here: its lines cannot be checked without the chain key; give --key-file",
                    ChainKey::SCHEME
                ));
            };
            match split_mac(line) {
                Some((body, mac)) if key.link(&body) == mac => {}
                Some(_) => return Err("the line's `mac` does not match: the line was edited or rebuilt without the chain key (or this is not the key that wrote it)".into()),
                None => return Err("a keyed line without its `mac` at the end".into()),
            }
            self.keyed_from.get_or_insert(seq);
        } else if self.keyed_from.is_some() {
            return Err("the line is not HMAC-chained though the lines before it are: lines were rewritten without the chain key".into());
        }
        match v["event"].as_str() {
            Some(STARTED) => {
                if let Some(id) = v["id"].as_str() {
                    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                    self.open
                        .insert(id.to_owned(), (seq, s("time"), s("endpoint")));
                }
            }
            Some(FINISHED) => {
                if let Some(id) = v["id"].as_str() {
                    self.open.remove(id);
                }
            }
            Some(CHECKPOINT) => self.seal(seq, prev, &v)?,
            _ => {}
        }
        self.expected = Some((seq + 1, link_of(line, &v)));
        Ok(())
    }

    /// A checkpoint line: its head is the link before it, its signature good.
    fn seal(&mut self, seq: u64, prev: &str, v: &Value) -> Result<(), String> {
        let (Some(head), Some(sig), Some(time)) = (
            v["head"].as_str(),
            v["signature"].as_str(),
            v["time"].as_str(),
        ) else {
            return Err("a checkpoint without `head`, `signature` or `time`".into());
        };
        if head != prev {
            return Err("the checkpoint's `head` is not the link to the line before it".into());
        }
        if let Some(pk) = self.check.public_key {
            if !pk.verifies(seq, head, time, sig) {
                return Err("the checkpoint's signature does not verify with this public key: forged, edited, or signed by another key".into());
            }
        }
        self.checkpoints += 1;
        self.last_checkpoint = Some((seq, time.to_owned()));
        self.sealed.insert(seq, (head.to_owned(), sig.to_owned()));
        Ok(())
    }
}

/// Checks the chain over `files` (in any order), each line's mac with the chain key,
/// each checkpoint's signature with the public key, and the log against its checkpoint
/// sidecar (`LOG.checkpoint`, found beside a given file or given itself); lists the
/// requests that started and never finished.
pub fn verify_with(files: &[PathBuf], check: Check<'_>) -> Result<Verified, Broken> {
    let is_sidecar = |p: &Path| p.to_string_lossy().ends_with(".checkpoint");
    let mut sidecars: Vec<PathBuf> = files.iter().filter(|p| is_sidecar(p)).cloned().collect();
    let files: Vec<&PathBuf> = files.iter().filter(|p| !is_sidecar(p)).collect();
    for f in &files {
        let s = Sidecar::path_for(f);
        if s.is_file() && !sidecars.contains(&s) {
            sidecars.push(s);
        }
    }
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
    let first_seq = ordered.first().map_or(0, |(s, _)| *s);
    if first_seq != 0 && !check.partial {
        return Err(Broken {
            file: ordered[0].1.display().to_string(),
            line: 1,
            problem: format!(
                "the chain starts at seq {first_seq}: lines 0 to {} are missing (give the older files, or --partial)",
                first_seq - 1
            ),
        });
    }
    let mut walk = Walk {
        check,
        expected: None,
        keyed_from: None,
        checkpoints: 0,
        last_checkpoint: None,
        sealed: HashMap::new(),
        open: HashMap::new(),
    };
    let mut lines = 0;
    // Where the last line is, for the breaks found at the end.
    let mut end = (String::new(), 0u64);
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
            walk.line(&buf[..buf.len() - 1]).map_err(broken)?;
            lines += 1;
        }
        end = (name, n);
    }
    let at_end = |problem: String| Broken {
        file: end.0.clone(),
        line: end.1,
        problem,
    };
    let last_seq = walk.expected.as_ref().map(|(s, _)| s - 1);
    if check.key.is_some() && walk.keyed_from.is_none() {
        return Err(at_end(
            "a chain key was given, but the log's lines are not HMAC-chained (written without a key, or rebuilt without it)".into(),
        ));
    }
    if check.public_key.is_some() && walk.checkpoints == 0 {
        return Err(at_end(
            "a public key was given, but the log holds no signed checkpoint".into(),
        ));
    }
    // The newest sidecar: the log must reach its checkpoint and hold it unchanged.
    let mut newest: Option<(PathBuf, Sidecar)> = None;
    for p in sidecars {
        let s = Sidecar::read(&p)
            .map_err(|e| Broken {
                file: p.display().to_string(),
                line: 0,
                problem: e.to_string(),
            })?
            .ok_or_else(|| Broken {
                file: p.display().to_string(),
                line: 0,
                problem: "cannot read: not found".into(),
            })?;
        if newest.as_ref().is_none_or(|(_, n)| s.seq > n.seq) {
            newest = Some((p, s));
        }
    }
    if let Some((p, s)) = &newest {
        let side = |problem: String| Broken {
            file: p.display().to_string(),
            line: 0,
            problem,
        };
        if let Some(pk) = check.public_key {
            if !pk.verifies(s.seq, &s.head, &s.time, &s.signature) {
                return Err(side(
                    "the sidecar's signature does not verify with this public key".into(),
                ));
            }
        }
        match last_seq {
            Some(last) if last >= s.seq => {}
            _ => {
                let ends = last_seq.map_or("holds no lines".into(), |l| format!("ends at seq {l}"));
                return Err(at_end(format!(
                    "log truncated: it {ends}, but its sidecar {} holds a signed checkpoint at seq {} ({}): the lines up to that checkpoint and any after it are missing",
                    p.display(),
                    s.seq,
                    s.time
                )));
            }
        }
        if s.seq >= first_seq
            && walk.sealed.get(&s.seq) != Some(&(s.head.clone(), s.signature.clone()))
        {
            return Err(side(format!(
                "the log's line at seq {} is not the checkpoint the sidecar holds: the log was rewritten",
                s.seq
            )));
        }
    }
    let mut unfinished: Vec<Unfinished> = walk
        .open
        .into_iter()
        .map(|(id, (seq, time, endpoint))| Unfinished {
            id,
            seq,
            time,
            endpoint,
        })
        .collect();
    unfinished.sort_by_key(|u| u.seq);
    Ok(Verified {
        lines,
        first_seq,
        last_seq,
        head: walk.expected.map_or_else(|| GENESIS.to_owned(), |(_, h)| h),
        files: ordered.into_iter().map(|(_, p)| p).collect(),
        keyed_from: walk.keyed_from,
        checkpoints: walk.checkpoints,
        last_checkpoint: walk.last_checkpoint,
        signed: check.public_key.is_some(),
        sidecar: newest,
        unfinished,
    })
}
