//! Operator control, end to end over real HTTP with the real model: the keys file (scopes,
//! limits, `hearth keys`, SIGHUP reload), the audit log (`hearth audit verify`), request
//! caps and slow-client timeouts.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{add_key, chat, Server};
use serde_json::{json, Value};

fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env_remove("HEARTH_API_KEYS_FILE")
        .output()
        .expect("the binary runs")
}

/// `hearth audit verify`'s output when it passed over `lines` lines: its stdout.
fn verified(out: &Output, lines: usize) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!("ok: {lines} lines")),
        "{stdout}"
    );
    stdout
}

fn keys_cmd(file: &Path, args: &[&str]) -> Output {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--api-keys-file", file.to_str().unwrap()]);
    hearth(&all)
}

fn hup(server: &Server) {
    let ok = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn sigterm(server: &mut Server) {
    let ok = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

fn chat_as(server: &Server, key: &str, max_tokens: u64) -> (u16, Value, Option<String>) {
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        Some(&chat("Say hi.", max_tokens).to_string()),
        Some(key),
    );
    let status = r.status;
    let retry = r.header("retry-after").map(str::to_owned);
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    (status, v, retry)
}

/// Polls until `f` holds (a reload is asynchronous to the signal's sender).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn long_stream_as(server: &Server, key: &str, max_tokens: u64) -> common::http_client::Events {
    let mut body = chat("Tell me a long story.", max_tokens);
    body["ignore_eos"] = json!(true);
    body["stream"] = json!(true);
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        Some(key),
    );
    assert_eq!(r.status, 200);
    r.events()
}

fn drain(events: &mut common::http_client::Events) -> Vec<String> {
    let mut all = Vec::new();
    while let Some(d) = events.next_data().unwrap() {
        all.push(d);
    }
    all
}

#[test]
fn keys_scopes_limits_reload_and_the_audit_chain() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let log = dir.path().join("audit.log");
    let alice = add_key(&keys, "alice", &["--rpm", "2"]);
    let bob = add_key(&keys, "bob", &["--models", "some-other-model"]);
    let carol = add_key(&keys, "carol", &["--concurrent", "1"]);
    let dave = add_key(&keys, "dave", &["--tpm", "40"]);
    // The file holds hashes only, readable by its owner alone.
    let text = std::fs::read_to_string(&keys).unwrap();
    for k in [&alice, &bob, &carol, &dave] {
        assert!(!text.contains(k.as_str()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A name can be used once; list shows names and limits, never keys.
    let again = keys_cmd(&keys, &["add", "alice"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let list = keys_cmd(&keys, &["list"]);
    let list = String::from_utf8(list.stdout).unwrap();
    for name in ["alice", "bob", "carol", "dave"] {
        assert!(list.contains(name), "{list}");
    }
    assert!(
        list.contains("some-other-model") && !list.contains("hk-"),
        "{list}"
    );

    let mut server = Server::start(&[
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--audit-log",
        log.to_str().unwrap(),
        "--audit-fsync",
        "always",
    ]);

    // Authentication.
    let (status, v) = server.post_raw("/v1/chat/completions", &chat("Hi", 4).to_string(), None);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (status, _, _) = chat_as(&server, "hk-not-a-key", 4);
    assert_eq!(status, 401);

    // Requests per minute: two, then 429 with Retry-After.
    for _ in 0..2 {
        assert_eq!(chat_as(&server, &alice, 4).0, 200);
    }
    let (status, v, retry) = chat_as(&server, &alice, 4);
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 requests per minute"));
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");

    // Model scope: bob may not use the served model, and does not see it.
    let (status, v, _) = chat_as(&server, &bob, 4);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let r = server.request("GET", "/v1/models", None, Some(&bob));
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v["data"], json!([]));
    let r = server.request("GET", "/v1/models", None, Some(&alice));
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);

    // Concurrency: carol's second request while her first streams is refused.
    let mut first = long_stream_as(&server, &carol, 48);
    assert!(first.next_data().unwrap().is_some());
    let (status, v, retry) = chat_as(&server, &carol, 4);
    assert_eq!(status, 429, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1 concurrent"));
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(drain(&mut first).last().map(String::as_str), Some("[DONE]"));
    assert_eq!(chat_as(&server, &carol, 4).0, 200);

    // Tokens per minute: a request that could use more than dave's 40 is refused up
    // front; one that fits holds its most, so the next waits for what it needs.
    let (status, v, _) = chat_as(&server, &dave, 32);
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );
    let (status, v, _) = chat_as(&server, &dave, 4);
    assert_eq!(status, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let spent = v["usage"]["total_tokens"].as_u64().unwrap();
    let (status, v, retry) = chat_as(&server, &dave, 4);
    assert_eq!(status, 429, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("40 tokens per minute"));
    let retry: u64 = retry.unwrap().parse().unwrap();
    // (prompt + 4) tokens needed, (40 − spent) free, at 40 per minute.
    let want = ((prompt + 4 - (40 - spent)) as f64 * 60.0 / 40.0).ceil() as u64;
    assert!(retry.abs_diff(want) <= 2, "{retry} vs {want}");

    // SIGHUP: a key added to the file works after the reload; a revoked key stops
    // working, but its stream in flight runs to the end.
    let eve = add_key(&keys, "eve", &[]);
    assert_eq!(chat_as(&server, &eve, 4).0, 401);
    let mut in_flight = long_stream_as(&server, &carol, 64);
    assert!(in_flight.next_data().unwrap().is_some());
    let revoke = keys_cmd(&keys, &["revoke", "carol"]);
    assert!(revoke.status.success());
    hup(&server);
    // Polls that land before the reload is in force are refused (and audited) too.
    let mut eve_refused = 0;
    eventually("eve's key works", || match chat_as(&server, &eve, 4).0 {
        200 => true,
        401 => {
            eve_refused += 1;
            false
        }
        other => panic!("eve's request: {other}"),
    });
    let events = drain(&mut in_flight);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() > 60, "the revoked key's stream ran to the end");
    assert_eq!(chat_as(&server, &carol, 4).0, 401);
    // A broken file is not taken: the keys in force stay.
    std::fs::write(&keys, "[[key]]\nname = \"x\"\n").unwrap();
    hup(&server);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(chat_as(&server, &eve, 4).0, 200);
    sigterm(&mut server);

    // Every request is in the audit log, by key name, never by key.
    let text = std::fs::read_to_string(&log).unwrap();
    for k in [&alice, &bob, &carol, &dave, &eve] {
        assert!(!text.contains(k.as_str()));
    }
    let lines = audit_lines(&log);
    let count = |key: Option<&str>, status: u64| {
        lines
            .iter()
            .filter(|l| {
                l["key"].as_str() == key
                    && l["status"] == status
                    && l["endpoint"] == "/v1/chat/completions"
            })
            .count()
    };
    assert_eq!(
        count(None, 401),
        3 + eve_refused,
        "no key, an unknown key, eve's before the reload (and polls before it took effect)"
    );
    assert_eq!(count(Some("alice"), 200), 2);
    assert_eq!(count(Some("alice"), 429), 1);
    assert_eq!(count(Some("bob"), 403), 1);
    assert_eq!(count(Some("carol"), 429), 1);
    assert_eq!(
        count(Some("carol"), 401),
        1,
        "the revoked key's attempt names it"
    );
    assert_eq!(count(Some("dave"), 429), 1);
    for l in &lines {
        assert!(l["time"].as_str().unwrap().ends_with('Z'));
        assert!(l["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(
            l.get("prompt").is_none(),
            "no content without --audit-content"
        );
        if l["status"] == 200 && l["endpoint"] == "/v1/chat/completions" {
            assert!(l["prompt_tokens"].as_u64().unwrap() > 0);
            assert!(l["completion_tokens"].as_u64().unwrap() > 0);
            assert!(l["latency_ms"].as_f64().unwrap() > 0.0);
            assert_eq!(l["model"], "SmolLM2-135M-Instruct.Q4_1");
            assert_eq!(l["finish_reasons"].as_array().unwrap().len(), 1);
        }
        if l["status"] == 429 {
            assert_eq!(l["error"], "rate_limit_exceeded");
        }
    }
    let streamed = lines
        .iter()
        .filter(|l| l["stream"] == true && l["key"] == "carol" && l["status"] == 200)
        .collect::<Vec<_>>();
    assert_eq!(streamed.len(), 2);
    assert!(streamed
        .iter()
        .all(|l| l["finish_reasons"] == json!(["length"])));

    // The chain verifies; an edited line is found by number.
    verified(
        &hearth(&["audit", "verify", log.to_str().unwrap()]),
        lines.len(),
    );
    let edited = text.replacen("\"status\":403", "\"status\":200", 1);
    assert_ne!(edited, text);
    std::fs::write(&log, &edited).unwrap();
    let bob_line = lines.iter().position(|l| l["status"] == 403).unwrap() + 1;
    let out = hearth(&["audit", "verify", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("audit.log:{}:", bob_line + 1)),
        "the line after the edit: {err}"
    );
}

#[test]
fn audit_content_streams_cancellation_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mut server = Server::start(&[
        "--audit-log",
        log.to_str().unwrap(),
        "--audit-content",
        "--audit-rotate-size",
        "2K",
    ]);
    let (status, whole) = server.post("/v1/chat/completions", &chat("Name a colour.", 12));
    assert_eq!(status, 200);
    let mut body = chat("Count to five.", 12);
    body["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &body);
    let streamed = common::streamed_content(&events);
    let (status, _) = server.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200);
    // A client that leaves mid-stream.
    let mut gone = server.long_stream("Tell me a long story.", 400);
    for _ in 0..3 {
        gone.next_data().unwrap();
    }
    drop(gone);
    // A client that leaves before a whole (non-streamed) answer is ready.
    let mut body = chat("Tell me a long story.", 300);
    body["ignore_eos"] = json!(true);
    let body = body.to_string();
    let mut s = TcpStream::connect(&server.authority).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    // Enough requests to rotate a few times.
    for i in 0..8 {
        let (status, _) = server.post("/v1/chat/completions", &chat(&format!("Say {i}."), 4));
        assert_eq!(status, 200);
    }
    sigterm(&mut server);

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 3, "rotated at 2 KiB: {files:?}");
    // Any order: verify puts them in chain order.
    files.sort();
    files.reverse();
    let mut args = vec!["audit".to_string(), "verify".into()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = hearth(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each request has its `started` and its `finished` line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("ok: 26 lines"), "{stdout}");
    assert!(!stdout.contains("never finished"), "{stdout}");
    // Without the first file the start is missing (unless --partial).
    let oldest = dir.path().join("audit.log.1");
    let rest: Vec<String> = files
        .iter()
        .filter(|f| **f != oldest)
        .map(|f| f.display().to_string())
        .collect();
    let mut args = vec!["audit", "verify"];
    args.extend(rest.iter().map(String::as_str));
    assert_eq!(hearth(&args).status.code(), Some(1));
    args.push("--partial");
    assert!(hearth(&args).status.success());

    let mut lines: Vec<Value> = files.iter().flat_map(|f| audit_lines(f)).collect();
    lines.sort_by_key(|l| l["seq"].as_u64().unwrap());
    lines.retain(|l| l["event"] == "finished");
    assert_eq!(lines.len(), 13);
    let whole_line = &lines[0];
    assert_eq!(
        whole_line["prompt"],
        json!([{"role": "user", "content": "Name a colour."}])
    );
    assert_eq!(
        whole_line["completions"][0],
        whole["choices"][0]["message"]["content"]
    );
    assert_eq!(whole_line["key"], Value::Null);
    let stream_line = &lines[1];
    assert_eq!(stream_line["stream"], true);
    assert_eq!(stream_line["completions"][0].as_str().unwrap(), streamed);
    let completion_line = &lines[2];
    assert_eq!(completion_line["prompt"], "The capital of France is");
    let cancelled = lines
        .iter()
        .find(|l| l["finish_reasons"] == json!(["cancelled"]))
        .expect("the cancelled stream is recorded");
    assert_eq!(cancelled["finish_reasons"], json!(["cancelled"]));
    let n = cancelled["completion_tokens"].as_u64().unwrap();
    // The role chunk and two tokens were read before the client left.
    assert!((2..400).contains(&n), "{cancelled}");
    let left = lines
        .iter()
        .find(|l| l["status"] == 499)
        .expect("the whole request whose client left is recorded");
    assert_eq!(left["error"], "client_closed_request");
    assert_eq!(left["finish_reasons"], json!(["cancelled"]));
}

#[test]
fn request_caps_and_slow_clients() {
    let server = Server::start(&[
        "--max-prompt-tokens",
        "40",
        "--max-tokens",
        "8",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-body-kb",
        "16",
    ]);
    let long = "word ".repeat(60);
    let (status, v) = server.post("/v1/chat/completions", &chat(&long, 4));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{v}"
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 40 tokens"));
    let (status, v) = server.post("/v1/chat/completions", &chat("Hi", 9));
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );
    // Without max_tokens, the cap is the default.
    let mut body = chat("Tell me a long story.", 0);
    body.as_object_mut().unwrap().remove("max_tokens");
    body["ignore_eos"] = json!(true);
    let (status, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Bodies over --max-body-kb.
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(20_000)}]});
    let (status, v) = server.post("/v1/chat/completions", &big);
    assert_eq!(status, 413, "{v}");

    // A body that stops coming: 408 after the body timeout.
    let mut s = TcpStream::connect(&server.authority).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"messages\""
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("request_timeout"));
    assert!(start.elapsed() < Duration::from_secs(5));

    // Headers that never finish, and a connection that never speaks: closed.
    for partial in ["GET /v1/models HTTP/1.1\r\nHost: x\r\n", ""] {
        let mut s = TcpStream::connect(&server.authority).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let start = Instant::now();
        s.write_all(partial.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{partial:?}: closed after {waited:?}"
        );
        assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    }
    // The server is fine afterwards.
    assert_eq!(server.get("/v1/models").0, 200);
}

#[test]
fn an_empty_keys_file_still_requires_a_key_and_sighup_never_kills() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "").unwrap();
    let server = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    let (status, _) = server.post_raw("/v1/chat/completions", &chat("Hi", 2).to_string(), None);
    assert_eq!(status, 401, "a keys file with no keys opens nothing");
    let key = add_key(&keys, "late", &[]);
    hup(&server);
    eventually("the key added later works", || {
        chat_as(&server, &key, 2).0 == 200
    });

    // Without a keys file, SIGHUP is logged and ignored.
    let plain = Server::start(&[]);
    hup(&plain);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(plain.post("/v1/chat/completions", &chat("Hi", 2)).0, 200);
}

/// The default model's pinned sha256, from models/manifest.toml.
fn default_model_sha256() -> String {
    let manifest = std::fs::read_to_string(common::root().join("models/manifest.toml")).unwrap();
    let entry = manifest
        .split("[[model]]")
        .find(|e| e.contains("file = \"SmolLM2-135M-Instruct.Q4_1.gguf\""))
        .unwrap();
    let line = entry
        .lines()
        .find(|l| l.starts_with("sha256"))
        .unwrap()
        .to_owned();
    line.split('"').nth(1).unwrap().to_owned()
}

#[test]
fn keyed_signed_audit_log_names_the_model_and_finds_a_cut_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let chain = dir.path().join("chain.key");
    let out = hearth(&[
        "audit",
        "keygen",
        "--out",
        dir.path().join("audit").to_str().unwrap(),
        "--chain-key",
        chain.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (private, public) = (dir.path().join("audit.key"), dir.path().join("audit.pub"));
    let serve_args = [
        "--audit-log",
        log.to_str().unwrap(),
        "--audit-key-file",
        chain.to_str().unwrap(),
        "--audit-signing-key",
        private.to_str().unwrap(),
        "--audit-checkpoint-every",
        "3",
    ];
    let mut server = Server::start(&serve_args);
    let mut body = chat("Say hi.", 4);
    body["user"] = json!("user-42");
    assert_eq!(server.post("/v1/chat/completions", &body).0, 200);
    let mut body = chat("Say hi.", 4);
    body["model"] = json!("gpt-4o");
    let (status, err) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 404, "{err}");
    let (status, _) = server.post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 3, "user": "u2"}),
    );
    assert_eq!(status, 200);
    sigterm(&mut server);

    let lines = audit_lines(&log);
    let finished: Vec<&Value> = lines.iter().filter(|l| l["event"] == "finished").collect();
    assert_eq!(finished.len(), 3);
    let sha = default_model_sha256();
    for l in &finished {
        assert_eq!(l["model_file"], "SmolLM2-135M-Instruct.Q4_1.gguf", "{l}");
        assert_eq!(l["model_sha256"], sha.as_str(), "{l}");
        // Its `started` line carries the same id.
        assert!(lines
            .iter()
            .any(|s| s["event"] == "started" && s["id"] == l["id"]));
    }
    assert_eq!(finished[0]["user"], "user-42");
    assert_eq!(finished[1]["status"], 404);
    assert_eq!(finished[1]["error"], "model_not_found");
    assert_eq!(finished[1]["requested_model"], "gpt-4o");
    assert_eq!(finished[2]["user"], "u2");
    assert!(lines.iter().all(|l| l["chain"] == "hmac-sha256"));
    // Sealed at shutdown: the last line is a checkpoint, also kept in the sidecar.
    assert_eq!(lines.last().unwrap()["event"], "checkpoint");
    let sidecar = dir.path().join("audit.log.checkpoint");
    assert!(sidecar.is_file());

    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify", log.to_str().unwrap()];
        args.extend_from_slice(extra);
        hearth(&args)
    };
    let full = [
        "--key-file",
        chain.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
    ];
    let stdout = verified(&verify(&full), lines.len());
    assert!(stdout.contains("keyed: hmac-sha256 from seq 0"), "{stdout}");
    assert!(stdout.contains("signatures checked"), "{stdout}");
    assert!(stdout.contains("audit.log.checkpoint"), "{stdout}");
    assert!(!stdout.contains("never finished"), "{stdout}");
    // Without the chain key it cannot pass.
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key-file"));

    // The last two lines cut: the sidecar's checkpoint is missing.
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: String = text
        .lines()
        .take(lines.len() - 2)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, &kept).unwrap();
    let out = verify(&full);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log truncated"), "{err}");

    // Whole again; a server killed mid-request leaves a `started` line that verify
    // lists.
    std::fs::write(&log, &text).unwrap();
    let mut server = Server::start(&serve_args);
    let mut events = server.long_stream("Tell me a long story.", 400);
    for _ in 0..3 {
        events.next_data().unwrap();
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let out = verify(&full);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 request(s) started and never finished"),
        "{stdout}"
    );
    assert!(stdout.contains("/v1/chat/completions"), "{stdout}");
}

#[test]
fn api_keys_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "# the team's keys\n\nsk-one\n  sk-two  \n").unwrap();
    let server = Server::start(&["--api-key-file", keys.to_str().unwrap()]);
    assert_eq!(chat_as(&server, "sk-two", 2).0, 200);
    assert_eq!(chat_as(&server, "sk-one", 2).0, 200);
    assert_eq!(chat_as(&server, "sk-three", 2).0, 401);
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        Some(&chat("Hi", 2).to_string()),
        None,
    );
    assert_eq!(r.status, 401);
    drop(server);

    // A bad line is named; a key on the command line draws a warning.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "sk-ok\nsk two\n").unwrap();
    let out = hearth(&[
        "serve",
        "--port",
        "0",
        "--api-key",
        "sk-visible",
        "--api-key-file",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.txt:2:"), "{err}");
    assert!(
        err.contains("warning: --api-key") && err.contains("--api-key-file"),
        "{err}"
    );
}
