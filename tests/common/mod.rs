//! Shared by the end-to-end tests: `hearth serve` on a free loopback port with the
//! default model, and a client that checks the wire format.

// Not every test binary uses every helper.
#![allow(dead_code)]

#[path = "../../src/http_client.rs"]
#[allow(dead_code)] // the load generator uses the rest
pub mod http_client;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub authority: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Starts `cmd` (a `hearth serve`, perhaps under another program) with stdout piped and
/// reads the address from its first line, `hearth: listening on SCHEME://ADDR`.
pub fn spawn_listening(cmd: &mut Command, scheme: &str) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let authority = line
        .trim()
        .strip_prefix(&format!("hearth: listening on {scheme}://"))
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("unexpected first line {line:?}")
        })
        .to_owned();
    (child, authority)
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_env(extra, &[])
    }

    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let model = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(model.is_file(), "run scripts/fetch-default-model");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.args(["serve", "--port", "0", "-t", "2"])
            .args(extra)
            .env_remove("HEARTH_API_KEYS")
            .env_remove("HEARTH_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, authority) = spawn_listening(&mut cmd, "http");
        let server = Server { child, authority };
        let start = Instant::now();
        while server.get("/ready").0 != 200 {
            assert!(start.elapsed() < TIMEOUT, "the server never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> http_client::Response {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        http_client::send(
            &self.authority,
            method,
            path,
            &headers,
            body.map(str::as_bytes),
            TIMEOUT,
        )
        .expect("the server answers")
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self.request("GET", path, None, None);
        (r.status, r.text().unwrap())
    }

    /// POST a JSON body; status and parsed JSON.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    pub fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let r = self.request("POST", path, Some(body), key);
        let status = r.status;
        let text = r.text().unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
        (status, v)
    }

    /// POST with `stream: true`; every `data:` payload, in order, checking the wire.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self.request("POST", path, Some(&body.to_string()), None);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let raw = r.text().unwrap();
        assert!(raw.ends_with("data: [DONE]\n\n"), "{raw:?}");
        let events: Vec<&str> = raw.trim_end().split("\n\n").collect();
        events
            .iter()
            .map(|e| {
                let data = e
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"));
                assert!(!data.contains('\n'), "one line per event: {e:?}");
                data.to_owned()
            })
            .collect()
    }

    /// Starts a streaming chat that runs to `max_tokens` (`ignore_eos`); its events.
    pub fn long_stream(&self, content: &str, max_tokens: u64) -> http_client::Events {
        let mut body = chat(content, max_tokens);
        body["ignore_eos"] = json!(true);
        body["stream"] = json!(true);
        let body = body.to_string();
        self.request("POST", "/v1/chat/completions", Some(&body), None)
            .events()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
            .parse()
            .unwrap()
    }
}

/// The text of a streamed chat reply: every `delta.content` of the first choice.
pub fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Resident memory of a process, in KiB (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `hearth keys add NAME ARGS... --api-keys-file FILE`; the key it printed.
pub fn add_key(file: &std::path::Path, name: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["keys", "add", name, "--api-keys-file"])
        .arg(file)
        .args(args)
        .env_remove("HEARTH_API_KEYS_FILE")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("hk-"), "{key}");
    key
}

pub fn chat(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}
