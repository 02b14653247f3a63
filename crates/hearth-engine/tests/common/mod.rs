//! Shared by the engine's end-to-end tests: the default model, loaded from models/.

// Not every test binary uses every helper.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Device;
use hearth_engine::LoadedModel;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model on the CPU; fails with how to fetch it when it is missing.
pub fn default_model() -> LoadedModel {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-default-model",
        path.display()
    );
    LoadedModel::load(&path, &Device::Cpu).unwrap()
}
