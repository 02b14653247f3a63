//! `hearth-engine` turns token ids into token ids: the model architectures on candle, the
//! KV cache, the sampler and constrained decoding. It knows nothing of HTTP or JSON, and it never opens a
//! network connection; it reads weights only through `hearth-models`.

pub mod constraint;
pub mod device;
pub mod embed;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod sampler;
pub mod scheduler;

pub use constraint::{CompileError, Constraint, Constraints, Grammar, GrammarError, GrammarLimits};
pub use device::parse_device;
pub use embed::{EmbedHandle, Embedder, Pooling};
pub use generate::{FinishReason, GenerationStats, LoadedModel};
pub use hearth_kernels::Arithmetic;
pub use kv_cache::{BlockTable, KvCache, KvDtype, BLOCK_SIZE};
pub use llama::{BatchItem, Llama, LoadOptions};
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::{Event, Request, SchedulerConfig, SchedulerHandle, SubmitError};

/// Why the engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] hearth_models::ModelError),
    #[error("cannot load the weights: {0}")]
    Load(String),
    #[error("the prompt and output need {needed} tokens but the model's context is {context}")]
    ContextOverflow { needed: usize, context: usize },
    #[error("the KV cache is full: {needed} blocks needed, {free} free")]
    KvCacheFull { needed: usize, free: usize },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("device: {0}")]
    Device(String),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
