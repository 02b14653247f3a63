//! Any bytes through the GGUF reader, the config, the tokenizer builder and the chat
//! template: errors are fine, panics, hangs and huge allocations are not.
#![no_main]

use hearth_models::{GgufFile, ModelConfig, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for info in file.tensors.values() {
        let bytes = file.tensor_data(info);
        assert_eq!(bytes.len(), info.size_bytes);
    }
    let _ = ModelConfig::from_gguf(&file);
    if let Ok(tok) = Tokenizer::from_gguf(&file) {
        let _ = tok.encode("Hello <s> world 123", true);
    }
    if let Ok(Some(src)) = file.str_key("tokenizer.chat_template") {
        if let Ok(t) = hearth_models::ChatTemplate::new(src, "<s>", "</s>") {
            let _ = t.render(&[hearth_models::ChatMessage::new("user", "hi")], true);
        }
    }
});
