//! The files an operator or an auditor hands us: the keys file, a model manifest, an
//! audit log to verify, and a Hugging Face `config.json`. Errors are fine; panics, hangs
//! and huge allocations are not.
//! Keys files that parse must survive a write/read round trip unchanged.
#![no_main]

use std::io::Write;

use hearth_server::keys::{KeyStore, KeysFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = KeysFile::parse(text) {
        let again = KeysFile::parse(&file.to_toml()).expect("a parsed file writes back readable");
        assert_eq!(again, file);
        let store = KeyStore::new(Some(&file), &[]);
        let _ = store.lookup(text);
    }
    let _ = hearth_models::locate::parse_manifest(std::path::Path::new("fuzz/manifest.toml"), text);
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        // Against the tensors of a small real layout (hidden 64, 4 heads of 16, ff 128).
        let mut tensors = std::collections::BTreeMap::new();
        let mut add = |name: String, dims: Vec<usize>| {
            tensors.insert(
                name.clone(),
                hearth_models::TensorInfo {
                    name,
                    dims,
                    dtype: hearth_models::GgmlType::F32,
                    offset: 0,
                    size_bytes: 0,
                    shard: 0,
                },
            );
        };
        add("token_embd.weight".into(), vec![64, 320]);
        add("output_norm.weight".into(), vec![64]);
        for (n, d) in [("attn_q", vec![64, 64]), ("attn_k", vec![64, 32]), ("attn_v", vec![64, 32])] {
            add(format!("blk.0.{n}.weight"), d);
        }
        let _ = hearth_models::ModelConfig::from_hf(&json, &tensors);
    }
    // The same bytes as an audit log (through a file: verify reads files).
    let path = std::env::temp_dir().join(format!("hearth-fuzz-audit-{}.log", std::process::id()));
    if let Ok(mut f) = std::fs::File::create(&path) {
        if f.write_all(data).is_ok() {
            let _ = hearth_server::audit::verify(&[path.clone()], false);
            let _ = hearth_server::audit::verify(&[path.clone()], true);
        }
    }
});
