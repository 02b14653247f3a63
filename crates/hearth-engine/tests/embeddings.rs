//! all-MiniLM-L6-v2 (fetched by scripts/fetch-embedding-model) against
//! sentence-transformers' vectors for ten sentences (tests/fixtures/embeddings.json,
//! made by scripts/gen-embedding-fixture): cosine ≥ 0.9999 each, alone and batched.

mod common;

use candle_core::Device;
use hearth_engine::{Embedder, Pooling};
use serde_json::Value;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = common::root().join("models/all-MiniLM-L6-v2");
    assert!(dir.is_dir(), "run scripts/fetch-embedding-model");
    assert!(Embedder::is_embedding_folder(&dir));
    let e = Embedder::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(
        (e.dim(), e.max_tokens(), e.pooling(), e.normalizes()),
        (384, 256, Pooling::Mean, true)
    );
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/embeddings.json")).unwrap(),
    )
    .unwrap();
    let sentences: Vec<String> = serde_json::from_value(fixture["sentences"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(fixture["embeddings"].clone()).unwrap();
    let tokens: Vec<Vec<u32>> = sentences.iter().map(|s| e.tokenize(s).unwrap()).collect();
    assert_eq!(
        tokens.last().unwrap().len(),
        256,
        "the long sentence is truncated"
    );
    let batched = e.embed(&tokens).unwrap();
    for (i, (s, w)) in sentences.iter().zip(&want).enumerate() {
        let alone = e.embed(std::slice::from_ref(&tokens[i])).unwrap().remove(0);
        for (how, v) in [("alone", &alone), ("batched", &batched[i])] {
            let c = cosine(v, w);
            eprintln!("{i} {how}: cosine {c:.7}");
            assert!(c >= 0.9999, "{s:?} {how}: cosine {c}");
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
    }
    // Different sentences are not the same vector (the check above can fail).
    assert!(cosine(&batched[0], &want[2]) < 0.9);
}
