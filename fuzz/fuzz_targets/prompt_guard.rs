//! Chat text from the network through control-token isolation, on arbitrary bytes with
//! the default model's tokenizer and ChatML template: whatever a message holds, the
//! prompt has exactly the template's control tokens, and the message's text comes back
//! when the prompt is decoded (as the tokenizer keeps it: it drops a few control
//! characters, as llama.cpp's does). Seeds: fuzz/corpus/prompt_guard/.
#![no_main]

use std::sync::OnceLock;

use hearth_models::{ChatMessage, GgufModel, PromptGuard};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    model: GgufModel,
    /// Control tokens in the prompt of an empty message.
    controls: usize,
}

fn ids(m: &GgufModel, text: &str) -> Option<Vec<u32>> {
    let mut g = PromptGuard::new(&m.tokenizer);
    let hidden = g.hide(text).ok()?;
    let rendered = m
        .chat_template
        .render(&[ChatMessage::new("user", hidden)], true)
        .expect("ChatML renders any text");
    Some(g.encode(&rendered, false).expect("the prompt tokenizes"))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let model = GgufModel::open(path).expect("run scripts/fetch-default-model");
        let empty = ids(&model, "").unwrap();
        let controls = empty.iter().filter(|&&i| model.tokenizer.is_control(i)).count();
        Fixture { model, controls }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let text = String::from_utf8_lossy(data);
    let Some(ids) = ids(&f.model, &text) else {
        return;
    };
    let tok = &f.model.tokenizer;
    assert_eq!(ids.iter().filter(|&&i| tok.is_control(i)).count(), f.controls);
    // Text without control-token strings: as the plain tokenizer keeps it.
    let plain = tok.encode(&text, false).expect("text tokenizes");
    if plain.iter().all(|&i| !tok.is_control(i)) {
        assert!(tok.decode(&ids, false).contains(&tok.decode(&plain, false)));
    }
});
