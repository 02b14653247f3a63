//! End-to-end tests of `hearth serve`: the real binary on a free loopback port with the
//! default model, spoken to over real HTTP (SSE wire format included).

#[path = "../src/http_client.rs"]
#[allow(dead_code)] // the load generator uses the rest
mod http_client;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    authority: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TIMEOUT: Duration = Duration::from_secs(120);

impl Server {
    fn start(extra: &[&str]) -> Self {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
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
        let mut child = cmd.spawn().expect("the binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let authority = line
            .trim()
            .strip_prefix("hearth: listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let server = Server { child, authority };
        let start = Instant::now();
        while server.get("/ready").0 != 200 {
            assert!(start.elapsed() < TIMEOUT, "the server never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn request(
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

    fn get(&self, path: &str) -> (u16, String) {
        let r = self.request("GET", path, None, None);
        (r.status, r.text().unwrap())
    }

    /// POST a JSON body; status and parsed JSON.
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let r = self.request("POST", path, Some(body), key);
        let status = r.status;
        let text = r.text().unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
        (status, v)
    }

    /// POST with `stream: true`; every `data:` payload, in order, checking the wire.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
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
    fn long_stream(&self, content: &str, max_tokens: u64) -> http_client::Events {
        let mut body = chat(content, max_tokens);
        body["ignore_eos"] = json!(true);
        body["stream"] = json!(true);
        let body = body.to_string();
        self.request("POST", "/v1/chat/completions", Some(&body), None)
            .events()
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
            .parse()
            .unwrap()
    }
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn fixture_greedy_text(case: usize, n: usize) -> String {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/greedy-smollm2.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = serde_json::from_value(f["cases"][case]["greedy_ids"].clone()).unwrap();
    let m = hearth_models::GgufModel::open(root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap();
    let end = ids
        .iter()
        .position(|&t| m.tokenizer.is_eog(t))
        .unwrap_or(ids.len())
        .min(n);
    m.tokenizer.decode(&ids[..end], false)
}

#[test]
fn models_health_ready_metrics_and_unknown_routes() {
    let s = Server::start(&[]);
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/ready").0, 200);
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(v["data"][0]["object"], "model");
    let (status, _) = s.get("/v1/models/SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(status, 200);
    let (status, body) = s.get("/v1/models/gpt-4");
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, body) = s.get("/v2/nothing");
    assert_eq!(status, 404);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());
    let (_, metrics) = s.get("/metrics");
    for name in [
        "hearth_requests_total{endpoint=\"health\",status=\"200\"} 1",
        "hearth_queue_depth 0",
        "hearth_running_sequences 0",
        "hearth_kv_cache_blocks_used 0",
        "hearth_kv_cache_usage_ratio",
        "hearth_prompt_tokens_total",
        "hearth_generation_tokens_total",
        "# TYPE hearth_time_to_first_token_seconds histogram",
        "# TYPE hearth_inter_token_latency_seconds histogram",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
}

#[test]
fn chat_matches_llama_cpp_whole_and_streamed() {
    let s = Server::start(&[]);
    // The greedy fixture's chat case 3, generated by llama.cpp.
    let want = fixture_greedy_text(3, 64);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &chat("What is the capital of Germany?", 64),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want.as_str());
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion < 64);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );

    let mut body = chat("What is the capital of Germany?", 64);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, want);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
    assert_eq!(last["usage"], *usage);
    assert!(
        chunks[1]["usage"].is_null(),
        "other chunks carry usage: null"
    );

    // Length-limited.
    let (_, v) = s.post(
        "/v1/chat/completions",
        &chat("What is the capital of Germany?", 3),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[test]
fn completions_stop_sequences_n_logprobs_and_echo() {
    let s = Server::start(&[]);
    let prompt = "The capital of France is";
    // Greedy, 24 tokens: llama.cpp's continuation (fixture case 0).
    let want = fixture_greedy_text(0, 24);
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // A stop sequence in the middle of the text: cut before it, never sent, even when
    // streamed token by token.
    let cut = want.char_indices().nth(want.chars().count() / 2).unwrap().0;
    let stop: String = want[cut..].chars().take(3).collect();
    let expected = &want[..want.find(&stop).unwrap()];
    let body =
        json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop, "zzzz"]});
    let (_, v) = s.post("/v1/completions", &body);
    assert_eq!(v["choices"][0]["text"], expected);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/completions", &streamed);
    let mut text = String::new();
    let mut finish = Value::Null;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        text.push_str(c["choices"][0]["text"].as_str().unwrap());
        if !c["choices"][0]["finish_reason"].is_null() {
            finish = c["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(text, expected);
    assert_eq!(finish, "stop");

    // n choices with a seed: reproducible, indexed, usage summed.
    let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3,
                      "ignore_eos": true});
    let (_, a) = s.post("/v1/completions", &body);
    let (_, b) = s.post("/v1/completions", &body);
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_eq!(a["choices"][i]["index"], i);
        assert_eq!(
            a["choices"][i]["text"], b["choices"][i]["text"],
            "same seed, same text"
        );
    }
    assert_eq!(a["usage"]["completion_tokens"], 24);

    // Logprobs, completions shape.
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": true}),
    );
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with(prompt), "echo");
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(
        lp["text_offset"][0].as_u64().unwrap() as usize,
        prompt.len()
    );
    let top0 = lp["top_logprobs"][0].as_object().unwrap();
    assert_eq!(top0.len(), 2);
    let best = top0
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(
        best,
        lp["token_logprobs"][0].as_f64().unwrap(),
        "greedy picks the top token"
    );

    // Logprobs, chat shape.
    let mut body = chat("Hi", 3);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (_, v) = s.post("/v1/chat/completions", &body);
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert!(content[0]["token"].is_string() && content[0]["bytes"].is_array());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);

    // logit_bias bans the greedy first token.
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 0}),
    );
    let first = v["choices"][0]["text"].as_str().unwrap().to_owned();
    let m = hearth_models::GgufModel::open(root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap();
    let id = m.tokenizer.encode(&first, false).unwrap()[0];
    let (_, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logit_bias": {id.to_string(): -100}}),
    );
    assert_ne!(v["choices"][0]["text"].as_str().unwrap(), first);
}

/// Status, error type and param of a failed POST.
fn error_of(s: &Server, body: &str) -> (u16, Value) {
    let (status, v) = s.post_raw("/v1/chat/completions", body, None);
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(
        e.get("type").is_some() && e.get("param").is_some() && e.get("code").is_some(),
        "{v}"
    );
    (status, v)
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = Server::start(&["--max-running", "1", "--max-queue", "1"]);
    let ok = chat("Hi", 2).to_string();
    assert_eq!(s.post_raw("/v1/chat/completions", &ok, None).0, 200);
    for (body, status, param) in [
        ("{not json".to_string(), 400, Value::Null),
        ("[1, 2]".to_string(), 400, Value::Null),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 5}).to_string(),
            400,
            json!("temperature"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "warm"})
                .to_string(),
            400,
            json!("temperature"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).to_string(),
            400,
            json!("max_tokens"),
        ),
        (json!({"model": "x"}).to_string(), 404, json!("model")),
        (
            json!({"temperature": 0.5}).to_string(),
            400,
            json!("messages"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "n": 0}).to_string(),
            400,
            json!("n"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]})
                .to_string(),
            400,
            json!("stop"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9000}).to_string(),
            400,
            json!("max_tokens"),
        ),
    ] {
        let (got, v) = error_of(&s, &body);
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    // A prompt longer than the context: 400 that says so.
    let long = "hearth ".repeat(9000);
    let (status, v) = error_of(&s, &chat(&long, 5).to_string());
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 8192"));
    // Oversized body: 413.
    let huge = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(5 << 20)
    );
    let (status, v) = error_of(&s, &huge);
    assert_eq!(status, 413, "{v}");

    // Queue full: one running, one waiting, the rest refused with 429 + Retry-After.
    let mut long = chat("Tell me a long story.", 400);
    long["ignore_eos"] = json!(true);
    long["stream"] = json!(true);
    let long = long.to_string();
    let first = s.request("POST", "/v1/chat/completions", Some(&long), None);
    let mut events = first.events();
    events.next_data().unwrap(); // the role chunk
    events.next_data().unwrap(); // a token: running, out of the queue
    let second = s.request("POST", "/v1/chat/completions", Some(&long), None);
    assert_eq!(second.status, 200); // waiting
    let mut refused = 0;
    for _ in 0..3 {
        let r = s.request("POST", "/v1/chat/completions", Some(&long), None);
        if r.status == 429 {
            assert_eq!(r.header("retry-after"), Some("1"));
            let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
            assert_eq!(v["error"]["type"], "rate_limit_error");
            refused += 1;
        }
    }
    assert_eq!(refused, 3);
    // 500s never leak internals: none happened.
    assert!(!s.get("/metrics").1.contains("status=\"500\""));
}

#[test]
fn api_keys_from_flags_and_environment() {
    let s = Server::start_env(
        &["--api-key", "key-one"],
        &[("HEARTH_API_KEYS", "key-two, key-three")],
    );
    assert_eq!(s.get("/health").0, 200, "/health stays open");
    assert_eq!(s.get("/ready").0, 200, "/ready stays open");
    let (status, v) = s.get("/v1/models");
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(s.get("/metrics").0, 401);
    let body = chat("Hi", 1).to_string();
    assert_eq!(
        s.post_raw("/v1/chat/completions", &body, Some("key-on")).0,
        401
    );
    assert_eq!(
        s.post_raw("/v1/chat/completions", &body, Some("key-one")).0,
        200
    );
    assert_eq!(
        s.post_raw("/v1/chat/completions", &body, Some("key-three"))
            .0,
        200
    );
}

#[test]
fn sixteen_concurrent_requests_get_their_solo_answers() {
    let s = Server::start(&[]);
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            let mut b = json!({
                "prompt": format!("Request {i}: {}", "tell me about hearths and fire. ".repeat(i % 5 + 1)),
                "max_tokens": 24,
                "temperature": 0,
            });
            if i % 2 == 1 {
                b["stream"] = json!(true);
            }
            b
        })
        .collect();
    let text_of = |s: &Server, b: &Value| -> String {
        if b["stream"] == json!(true) {
            let events = s.stream("/v1/completions", b);
            events[..events.len() - 1]
                .iter()
                .map(|e| {
                    serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        } else {
            let (status, v) = s.post("/v1/completions", b);
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_owned()
        }
    };
    let solo: Vec<String> = bodies.iter().map(|b| text_of(&s, b)).collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| scope.spawn(|| text_of(&s, b)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i}: batched answer differs from solo");
    }
}

#[test]
fn a_client_that_leaves_frees_its_sequence() {
    let s = Server::start(&[]);
    let mut events = s.long_stream("Tell me a very long story.", 2000);
    for _ in 0..3 {
        events.next_data().unwrap().unwrap();
    }
    assert_eq!(s.metric("hearth_running_sequences"), 1.0);
    assert!(s.metric("hearth_kv_cache_blocks_used") > 0.0);
    drop(events); // the connection closes
    let start = Instant::now();
    while s.metric("hearth_running_sequences") != 0.0
        || s.metric("hearth_kv_cache_blocks_used") != 0.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the sequence was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = s.metric("hearth_generation_tokens_total");
    assert!(generated < 2000.0, "{generated}");

    // The same for a non-streamed request whose client gives up waiting.
    let mut body = chat("Tell me a very long story.", 3000);
    body["ignore_eos"] = json!(true);
    let gave_up = http_client::send(
        &s.authority,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
        Duration::from_millis(500),
    );
    assert!(gave_up.is_err(), "3000 tokens cannot come back in 0.5 s");
    let start = Instant::now();
    while s.metric("hearth_running_sequences") != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the abandoned request was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("hearth_kv_cache_blocks_used"), 0.0);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut s = Server::start(&[]);
    let mut events = s.long_stream("Count from one to fifty.", 60);
    events.next_data().unwrap().unwrap();
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The stream in flight runs to its end.
    let mut last = String::new();
    while let Some(d) = events.next_data().unwrap() {
        last = d;
    }
    assert_eq!(last, "[DONE]");
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn shutdown_cancels_what_outlives_the_grace_period() {
    let mut s = Server::start(&["--shutdown-timeout", "1"]);
    let mut events = s.long_stream("Tell me a very long story.", 5000);
    events.next_data().unwrap().unwrap();
    let pid = s.child.id().to_string();
    let start = Instant::now();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "exit took {waited:?} with a 1 s grace period"
    );
}

#[test]
fn a_small_kv_cache_preempts_instead_of_failing() {
    // 3 MiB of KV cache: 8 blocks of 16 tokens for this model; four requests of ~40
    // prompt + 40 generated tokens need 20.
    let s = Server::start(&["--kv-cache-mb", "3"]);
    let bodies: Vec<Value> = (0..4)
        .map(|i| {
            let mut b = chat(&format!("Story {i}: tell me about a fox."), 40);
            b["ignore_eos"] = json!(true);
            b
        })
        .collect();
    let results: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| sc.spawn(|| s.post("/v1/chat/completions", b)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, v) in &results {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 40);
    }
    assert!(s.metric("hearth_preemptions_total") > 0.0);
    assert_eq!(s.metric("hearth_kv_cache_blocks_total"), 8.0);
    // A prompt that cannot fit the whole cache is a 400 that says why.
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "hearth ".repeat(200), "max_tokens": 1}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("KV cache"),
        "{v}"
    );
}
