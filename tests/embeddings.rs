//! `POST /v1/embeddings` over real HTTP with all-MiniLM-L6-v2 (scripts/fetch-embedding-model):
//! vectors against sentence-transformers' (tests/fixtures/embeddings.json), the OpenAI
//! shape (float and base64, usage), bad input, and concurrent requests batched together.

mod common;

use common::Server;
use serde_json::{json, Value};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn vector(v: &Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn embeddings_match_sentence_transformers_over_http() {
    let dir = common::root().join("models/all-MiniLM-L6-v2");
    assert!(dir.is_dir(), "run scripts/fetch-embedding-model");
    let server = Server::start(&["-m", dir.to_str().unwrap()]);
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/embeddings.json")).unwrap(),
    )
    .unwrap();
    let sentences = fixture["sentences"].clone();
    let (status, v) = server.post(
        "/v1/embeddings",
        &json!({"model": "all-MiniLM-L6-v2", "input": sentences}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "all-MiniLM-L6-v2");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 10);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let c = cosine(&vector(&d["embedding"]), &vector(&fixture["embeddings"][i]));
        assert!(c >= 0.9999, "sentence {i}: cosine {c}");
    }
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 256, "{tokens}");
    assert_eq!(v["usage"]["total_tokens"], tokens);

    // One string; base64 is the same floats, little-endian.
    let (_, one) = server.post(
        "/v1/embeddings",
        &json!({"input": "The hearth is the heart of the home."}),
    );
    let floats = vector(&one["data"][0]["embedding"]);
    assert_eq!(floats.len(), 384);
    let (_, b64) = server.post(
        "/v1/embeddings",
        &json!({"input": "The hearth is the heart of the home.", "encoding_format": "base64", "dimensions": 384}),
    );
    let text = b64["data"][0]["embedding"].as_str().unwrap();
    let bytes = decode_base64(text);
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, floats);

    // Bad requests name their parameter.
    for (body, param) in [
        (json!({}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": [1, 2, 3]}), "input"),
        (json!({"input": [[1, 2]]}), "input"),
        (json!({"input": {"a": 1}}), "input"),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "x", "dimensions": 128}), "dimensions"),
    ] {
        let (status, v) = server.post("/v1/embeddings", &body);
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }
    let (status, _) = server.post("/v1/embeddings", &json!({"input": "x", "model": "gpt-4"}));
    assert_eq!(status, 404);
    let (status, v) = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));

    // Concurrent requests share encoder passes.
    let before_batches = server.metric("hearth_embedding_batches_total");
    let before_requests = server.metric("hearth_embedding_requests_total");
    std::thread::scope(|s| {
        for i in 0..24 {
            let server = &server;
            s.spawn(move || {
                let (status, v) = server.post(
                    "/v1/embeddings",
                    &json!({"input": [format!("Concurrent request number {i}."), "A second text."]}),
                );
                assert_eq!(status, 200, "{v}");
                assert_eq!(v["data"].as_array().unwrap().len(), 2);
            });
        }
    });
    let batches = server.metric("hearth_embedding_batches_total") - before_batches;
    let requests = server.metric("hearth_embedding_requests_total") - before_requests;
    eprintln!("24 concurrent requests: {requests} served in {batches} encoder passes");
    assert_eq!(requests, 24.0);
    assert!(
        batches < requests,
        "{batches} passes for {requests} requests"
    );
}

#[test]
fn a_generation_model_says_it_has_no_embeddings() {
    let server = Server::start(&[]);
    let (status, v) = server.post("/v1/embeddings", &json!({"input": "x"}));
    assert_eq!(status, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not produce embeddings"));
}

fn decode_base64(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | alphabet.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
