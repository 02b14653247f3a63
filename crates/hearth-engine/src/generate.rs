//! One sequence from prompt to finish: chunked prefill, then decode, sample, repeat.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use hearth_models::GgufModel;

use crate::constraint::{
    CompileError, Constraint, Constraints, Grammar, GrammarError, GrammarLimits,
};
use crate::kv_cache::{BlockTable, KvCache};
use crate::llama::Llama;
use crate::sampler::{Sampler, SamplingParams};
use crate::EngineError;

/// Prompt tokens per forward pass during prefill.
pub const PREFILL_CHUNK: usize = 512;

/// Why generation stopped, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (not emitted) or a caller's stop.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What one generation cost.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
    pub finish_reason: FinishReason,
}

/// A model ready to run: the decoder plus what `hearth-models` read about it.
pub struct LoadedModel {
    pub model: Llama,
    pub info: GgufModel,
    /// Built on the first constrained request.
    constraints: std::sync::OnceLock<Result<std::sync::Arc<Constraints>, GrammarError>>,
}

impl LoadedModel {
    /// Opens the model at `path` (a GGUF file or a Hugging Face folder), validates it, and
    /// puts its weights on `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, EngineError> {
        Self::load_with(path, device, crate::llama::LoadOptions::default())
    }

    /// Like [`LoadedModel::load`], converting weights as `options` says.
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        options: crate::llama::LoadOptions,
    ) -> Result<Self, EngineError> {
        let info = GgufModel::open(path)?;
        let model = Llama::load_with(&info.weights, &info.config, device, options)?;
        Ok(Self {
            model,
            info,
            constraints: std::sync::OnceLock::new(),
        })
    }

    /// The grammar compiler for this model's tokenizer (built on first use).
    fn constraints(&self) -> Result<&std::sync::Arc<Constraints>, GrammarError> {
        self.constraints
            .get_or_init(|| {
                Constraints::new(self.info.tokenizer.clone(), self.info.config.vocab_size)
                    .map(std::sync::Arc::new)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Compiles a grammar for this model's tokenizer, for [`crate::Request::constraint`].
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        self.constraints()?.compile(grammar)
    }

    /// Compiles a grammar a client sent, within `limits` (see
    /// [`Constraints::compile_bounded`]).
    pub async fn constraint_bounded(
        &self,
        grammar: &Grammar,
        limits: &GrammarLimits,
    ) -> Result<Constraint, CompileError> {
        let c = self
            .constraints()
            .map_err(|e| CompileError::Invalid(e.0))?
            .clone();
        c.compile_bounded(grammar, limits).await
    }

    pub fn context_length(&self) -> usize {
        self.info.config.context_length
    }

    /// Runs the prompt through the model, in chunks, and returns the last logits.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        table: &mut BlockTable,
        prompt: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let mut logits = Vec::new();
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            logits = self.model.forward(cache, table, chunk)?;
        }
        Ok(logits)
    }

    /// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new token;
    /// `on_token` returns `false` to stop early (stop string seen, client gone).
    /// End-of-generation tokens end the sequence and are not passed on.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: SamplingParams,
        max_tokens: usize,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenerationStats, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::Input("the prompt is empty".into()));
        }
        let ctx = self.context_length();
        if prompt.len() >= ctx {
            return Err(EngineError::ContextOverflow {
                needed: prompt.len() + 1,
                context: ctx,
            });
        }
        params.validate().map_err(EngineError::Input)?;
        let max_tokens = max_tokens.min(ctx - prompt.len());
        let mut sampler = Sampler::new(params);
        let mut cache = self.model.cache_for_sequences(1)?;
        let mut table = BlockTable::new();
        let mut history = prompt.to_vec();

        let start = Instant::now();
        let mut logits = self.prefill(&mut cache, &mut table, prompt)?;
        let prompt_time = start.elapsed();

        let start = Instant::now();
        let mut generated = 0;
        let mut finish_reason = FinishReason::Length;
        while generated < max_tokens {
            let tok = sampler.sample(&mut logits, &history);
            if self.info.tokenizer.is_eog(tok) {
                finish_reason = FinishReason::Stop;
                break;
            }
            generated += 1;
            history.push(tok);
            if !on_token(tok) {
                finish_reason = FinishReason::Stop;
                break;
            }
            if generated == max_tokens {
                break;
            }
            logits = self.model.forward(&mut cache, &mut table, &[tok])?;
        }
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: generated,
            prompt_time,
            generation_time: start.elapsed(),
            finish_reason,
        })
    }
}
