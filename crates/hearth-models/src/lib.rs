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
pub mod guard;
pub mod hf;
pub mod locate;
pub mod pin;
pub mod tokenizer;
pub mod tools;

pub use chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use gguf::{GgmlType, GgufError, GgufFile, TensorInfo, Value};
pub use guard::{GuardError, PromptGuard};
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

/// Where a model's tensors come from.
#[derive(Debug)]
pub enum Weights {
    Gguf(GgufFile),
    Safetensors(hf::SafetensorsSet),
}

impl Weights {
    /// The tensor directory, by GGUF name.
    pub fn tensors(&self) -> &std::collections::BTreeMap<String, TensorInfo> {
        match self {
            Weights::Gguf(f) => &f.tensors,
            Weights::Safetensors(s) => &s.tensors,
        }
    }

    /// A tensor's bytes (checked against the file when it was opened).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        match self {
            Weights::Gguf(f) => f.tensor_data(info),
            Weights::Safetensors(s) => s.tensor_data(info),
        }
    }

    /// Bytes of the model's files.
    pub fn total_bytes(&self) -> usize {
        match self {
            Weights::Gguf(f) => f.file_size(),
            Weights::Safetensors(s) => s.total_bytes(),
        }
    }

    /// Number of weights, for reports.
    pub fn parameter_count(&self) -> usize {
        self.tensors().values().map(|t| t.element_count()).sum()
    }
}

/// Everything read about a model (a GGUF file or a Hugging Face folder) except the
/// weights' math.
#[derive(Debug)]
pub struct GgufModel {
    pub weights: Weights,
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
    #[error(transparent)]
    Hf(#[from] hf::HfError),
    #[error("{path}: {source}")]
    ChatTemplate {
        path: String,
        source: ChatTemplateError,
    },
}

impl GgufModel {
    /// Opens and validates a model: a GGUF file, or a Hugging Face folder.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::open_hf(path);
        }
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
            weights: Weights::Gguf(file),
            config,
            tokenizer: std::sync::Arc::new(tokenizer),
            chat_template,
        })
    }

    /// Opens a Hugging Face model folder.
    fn open_hf(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(hf::err(
                dir,
                "not a model folder: no config.json (a Hugging Face folder has config.json, tokenizer.json and model.safetensors)",
            )
            .into());
        }
        let config_json = hf::read_json(&config_path)?;
        let weights = hf::SafetensorsSet::open(dir)?;
        let config = ModelConfig::from_hf(&config_json, &weights.tensors)
            .map_err(|m| hf::err(&config_path, m))?;
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = hf::read_json_if_present(&tok_config_path)?;
        let gen = hf::read_json_if_present(&dir.join("generation_config.json"))?;
        let eos_ids: Vec<u32> = match &gen["eos_token_id"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            v => v.as_u64().map(|v| v as u32).into_iter().collect(),
        };
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_hf(&tok_path, &tok_config, &eos_ids)
            .map_err(|m| hf::err(&tok_path, m))?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(hf::err(
                &tok_path,
                format!(
                    "the tokenizer has {} tokens but the embedding matrix only {} rows",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            )
            .into());
        }
        // The template: tokenizer_config.json's `chat_template` (a string, or named
        // templates of which `default`), else chat_template.jinja, else ChatML.
        let jinja = dir.join("chat_template.jinja");
        let source = match &tok_config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or(list.first())
                .and_then(|t| t["template"].as_str())
                .unwrap_or(chat_template::CHATML)
                .to_owned(),
            _ if jinja.is_file() => {
                std::fs::read_to_string(&jinja).map_err(|e| hf::err(&jinja, e.to_string()))?
            }
            _ => chat_template::CHATML.to_owned(),
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or_default()
                .to_owned()
        };
        let chat_template = ChatTemplate::new(&source, &text(tokenizer.bos), &text(tokenizer.eos))
            .map_err(|source| ModelError::ChatTemplate {
                path: tok_config_path.display().to_string(),
                source,
            })?;
        Ok(Self {
            weights: Weights::Safetensors(weights),
            config,
            tokenizer: std::sync::Arc::new(tokenizer),
            chat_template,
        })
    }
}
