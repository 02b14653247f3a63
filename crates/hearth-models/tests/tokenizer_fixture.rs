//! The tokenizer rebuilt from GGUF metadata must give exactly llama.cpp's ids.
//! Fixture: tests/fixtures/tokenizer-smollm2.json, made by scripts/gen-fixtures.

use std::path::PathBuf;

use hearth_models::GgufModel;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> GgufModel {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-default-model",
        path.display()
    );
    GgufModel::open(&path).expect("the default model loads")
}

#[test]
fn token_ids_match_llama_cpp() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tokenizer-smollm2.json")).unwrap(),
    )
    .unwrap();
    let m = model();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 30, "the fixture has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = m.tokenizer.encode(text, false).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?}\n  llama.cpp: {want:?}\n  hearth:    {got:?}"
            ));
        }
        // Decoding round-trips to the exact text, and agrees with llama.cpp's.
        assert_eq!(m.tokenizer.decode(&got, false), text);
        assert_eq!(
            m.tokenizer.decode(&want, false),
            case["detokenized"].as_str().unwrap()
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_metadata_is_read() {
    let m = model();
    let c = &m.config;
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads),
        (576, 30, 9, 3)
    );
    assert_eq!(
        (c.context_length, c.vocab_size, c.head_dim),
        (8192, 49152, 64)
    );
    assert!(c.tied_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    let t = &m.tokenizer;
    assert!(!t.add_bos, "SmolLM2's GGUF sets add_bos_token = false");
    let im_end = t.token_id("<|im_end|>").unwrap();
    assert!(t.is_eog(im_end));
    assert_eq!(t.eos, Some(im_end));
    let rendered = m
        .chat_template
        .render(&[hearth_models::ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert!(rendered.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
}

/// The pre-tokenizer rules of other model families, checked on the same vocab: the
/// fixture swaps `tokenizer.ggml.pre` in a copy of the file and records llama.cpp's ids.
#[test]
fn other_pre_tokenizers_match_llama_cpp() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tokenizer-smollm2.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let variants = fixture["pre_variants"]["ids"].as_object().unwrap();
    assert!(variants.len() >= 6);
    let mut file =
        hearth_models::GgufFile::open(root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
            .unwrap();
    let mut failures = Vec::new();
    for (pre, cases) in variants {
        file.metadata.insert(
            "tokenizer.ggml.pre".into(),
            hearth_models::Value::String(pre.clone()),
        );
        let tok = hearth_models::Tokenizer::from_gguf(&file).unwrap();
        for (text, want) in texts.iter().zip(cases.as_array().unwrap()) {
            let want: Vec<u32> = serde_json::from_value(want.clone()).unwrap();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                failures.push(format!(
                    "pre={pre} {text:?}\n  llama.cpp: {want:?}\n  hearth:    {got:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
