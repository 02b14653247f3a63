//! The files an operator or an auditor hands us: the keys file, a model manifest, and an
//! audit log to verify. Errors are fine; panics, hangs and huge allocations are not.
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
    // The same bytes as an audit log (through a file: verify reads files).
    let path = std::env::temp_dir().join(format!("hearth-fuzz-audit-{}.log", std::process::id()));
    if let Ok(mut f) = std::fs::File::create(&path) {
        if f.write_all(data).is_ok() {
            let _ = hearth_server::audit::verify(&[path.clone()], false);
            let _ = hearth_server::audit::verify(&[path.clone()], true);
        }
    }
});
