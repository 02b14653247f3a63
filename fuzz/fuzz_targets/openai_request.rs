//! Request bodies from the network: JSON parsing, every field check, and the stop-sequence
//! holdback, on arbitrary bytes. Seeds: fuzz/seeds/openai_request/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hearth_server::fuzz_request(data);
});
