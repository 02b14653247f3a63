//! Fair admission between keys, end to end over real HTTP with the real model: one key
//! that fills the running batch and the queue neither locks other keys out nor makes
//! them wait for its work to finish, and its token budget holds for requests that could
//! overshoot it.

mod common;

use std::time::{Duration, Instant};

use common::{add_key, chat, Server};
use serde_json::{json, Value};

fn post_as(server: &Server, key: &str, body: &Value) -> (u16, Value, Option<String>) {
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        Some(key),
    );
    let status = r.status;
    let retry = r.header("retry-after").map(str::to_owned);
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    (status, v, retry)
}

/// A number from `/metrics` (which needs a key when keys are in use).
fn metric_as(server: &Server, key: &str, name: &str) -> f64 {
    let text = server
        .request("GET", "/metrics", None, Some(key))
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in /metrics: {text:.200}"))
        .parse()
        .unwrap()
}

#[test]
fn one_key_cannot_starve_another() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let hog = add_key(&keys, "hog", &[]);
    let light = add_key(&keys, "light", &[]);
    let metered = add_key(&keys, "metered", &["--tpm", "300"]);
    // 4 running slots; a key may have 8 sequences queued or running.
    let server = Server::start(&[
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--max-running",
        "4",
        "--max-queue",
        "16",
        "--max-sequences-per-key",
        "8",
    ]);

    // The hog: two streams of 4 choices each, long and past end-of-sequence: the whole
    // batch running and as much again waiting, for minutes in arrival order.
    let mut body = chat("Tell me a long story.", 3000);
    body["n"] = json!(4);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let r = server.request(
                "POST",
                "/v1/chat/completions",
                Some(&body.to_string()),
                Some(&hog),
            );
            assert_eq!(r.status, 200);
            r.events()
        })
        .collect();
    let mut first = streams.into_iter();
    let (mut running, queued) = (first.next().unwrap(), first.next().unwrap());
    // Its first stream is generating.
    while let Some(d) = running.next_data().unwrap() {
        if d.contains("\"content\"") {
            break;
        }
    }

    // Past its cap of 8: 429 naming the cap, with Retry-After.
    let (status, v, retry) = post_as(&server, &hog, &chat("Hi", 4));
    assert_eq!(status, 429, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 8"), "{message}");
    assert_eq!(retry.as_deref(), Some("1"));
    // More choices than the cap allows at all: 400, never worth retrying.
    let mut nine = chat("Hi", 4);
    nine["n"] = json!(9);
    let (status, v, _) = post_as(&server, &light, &nine);
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("n")),
        "{v}"
    );

    // Another key's small request is served now, not after the hog's 8 × 3000 tokens:
    // one of the hog's sequences gives up its slot (the hog has all 4, its fair share
    // is 2).
    let preempted_before = metric_as(&server, &light, "hearth_preemptions_total");
    let t = Instant::now();
    let (status, v, _) = post_as(&server, &light, &chat("Say hi.", 8));
    let waited = t.elapsed();
    assert_eq!(status, 200, "{v}");
    assert!(
        waited < Duration::from_secs(15),
        "the light key waited {waited:?} behind the hog"
    );
    assert!(metric_as(&server, &light, "hearth_preemptions_total") > preempted_before);
    eprintln!("light key served in {waited:?} beside the hog's 8 sequences");

    // Token budgets: a request that could use more than the key's whole minute is
    // refused up front (it used to be admitted and overshoot without bound).
    let mut big = chat("Hi", 200);
    big["n"] = json!(2);
    let (status, v, _) = post_as(&server, &metered, &big);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("300 tokens per minute"),
        "{v}"
    );
    drop((running, queued));
}
