//! Shared by the engine's end-to-end tests: the default model, loaded from models/.

// Not every test binary uses every helper.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use hearth_engine::scheduler::Event;
use hearth_engine::LoadedModel;
use tokio::sync::mpsc::UnboundedReceiver;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model on the CPU; fails with how to fetch it when it is missing.
pub fn default_model() -> LoadedModel {
    default_model_with(hearth_engine::LoadOptions::default())
}

/// The default model on the CPU, loaded with `options`.
pub fn default_model_with(options: hearth_engine::LoadOptions) -> LoadedModel {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-default-model",
        path.display()
    );
    LoadedModel::load_with(&path, &Device::Cpu, options).unwrap()
}

/// A two-thread compute pool, as the server makes on this machine class.
pub fn pool() -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    )
}

/// A request's tokens and the event that ended it.
pub fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, Event) {
    let mut tokens = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, .. } => tokens.push(id),
            end => return (tokens, end),
        }
    }
    panic!("the event stream ended without Finished or Failed");
}
