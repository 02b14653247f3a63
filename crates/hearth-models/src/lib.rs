//! `hearth-models` owns what is on disk: finding a model file, reading GGUF (metadata,
//! tensor directory, memory-mapped data), the typed [`ModelConfig`], the tokenizer
//! rebuilt from GGUF metadata, the chat template, and how the model writes tool calls.
//!
//! It does no tensor math and opens no network connection. Every byte it reads from a
//! file is bounds-checked: bad files give errors that name the file and the problem.

pub mod bom;
pub mod chat_template;
pub mod clock;
pub mod config;
pub mod gguf;
pub mod locate;
pub mod pin;
pub mod tokenizer;
pub mod tools;

pub use chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use gguf::{GgmlType, GgufError, GgufFile, TensorInfo, Value};
pub use tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError, TokenizerKind};
pub use tools::{ToolCall, ToolChoice, ToolFormat, ToolParser, ToolPiece, ToolSpec};

use std::path::Path;

/// A TOML error as one line: where (line, column and the line's text) and what.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let at = e.span().map(|s| {
        let before = text.get(..s.start).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let col = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        let source: String = text
            .lines()
            .nth(line - 1)
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        format!("line {line}, column {col} (`{}`): ", source.trim())
    });
    format!("{}{}", at.unwrap_or_default(), e.message().trim_end())
}

/// Everything read from one GGUF file except the weights' math.
#[derive(Debug)]
pub struct GgufModel {
    pub file: GgufFile,
    pub config: ModelConfig,
    /// Shared: constrained decoding keeps a handle to it.
    pub tokenizer: std::sync::Arc<Tokenizer>,
    /// The file's own chat template, or ChatML when it ships none.
    pub chat_template: ChatTemplate,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {source}")]
    ChatTemplate {
        path: String,
        source: ChatTemplateError,
    },
}

impl GgufModel {
    /// Opens and validates a GGUF model: config, tokenizer and chat template.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(file
                .error(format!(
                    "the tokenizer has {} tokens but the embedding matrix only {} rows",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ))
                .into());
        }
        let text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or_default()
                .to_owned()
        };
        let source = file
            .str_key("tokenizer.chat_template")?
            .unwrap_or(chat_template::CHATML);
        let chat_template = ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.eos))
            .map_err(|source| ModelError::ChatTemplate {
            path: file.path().display().to_string(),
            source,
        })?;
        Ok(Self {
            file,
            config,
            tokenizer: std::sync::Arc::new(tokenizer),
            chat_template,
        })
    }
}
