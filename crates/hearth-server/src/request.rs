//! OpenAI request bodies: the fields we read, their ranges, and what they become for
//! the engine. Unknown fields are ignored, as OpenAI's clients send many; known ones are
//! checked and a bad one is a 400 naming it.

use std::collections::HashMap;

use hearth_engine::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{fields, ApiError};

/// Fields shared by chat and text completions.
#[derive(Deserialize, Default, Debug)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<String>,
    /// vLLM's extension: keep generating past end-of-generation tokens.
    pub ignore_eos: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default, Debug)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`, beyond the common fields.
#[derive(Deserialize, Debug)]
pub struct ChatFields {
    pub messages: Option<Vec<Message>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Deserialize, Debug)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    pub tool_calls: Option<Vec<WireToolCall>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A call in an earlier assistant turn, as the client sends it back.
#[derive(Deserialize, Debug)]
pub struct WireToolCall {
    pub id: Option<String>,
    pub function: WireFunction,
}

#[derive(Deserialize, Debug)]
pub struct WireFunction {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `POST /v1/completions`, beyond the common fields.
#[derive(Deserialize, Debug)]
pub struct CompletionFields {
    pub prompt: Option<Prompt>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// What a request asks of the engine, validated.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Per choice: its sampling parameters (seeds differ between choices).
    pub params: Vec<SamplingParams>,
    /// Explicit limit, if the client gave one.
    pub max_tokens: Option<usize>,
    /// The name the client gave it by.
    pub max_tokens_param: &'static str,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Top log-probabilities per token, when asked for.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

fn range(param: &str, v: f32, lo: f32, hi: f32) -> Result<(), ApiError> {
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(
            Some(param),
            format!("Invalid '{param}': {v} is not between {lo} and {hi}."),
        ));
    }
    Ok(())
}

/// The request's random seed: the client's, or a fresh one.
fn seed(c: &CommonFields) -> u64 {
    match c.seed {
        Some(s) => s as u64,
        None => {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        }
    }
}

impl CommonFields {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        fields(body)
    }

    /// Checks ranges and builds the engine's view. `vocab` bounds `logit_bias` keys.
    pub fn generation(
        &self,
        logprobs: Option<usize>,
        vocab: usize,
    ) -> Result<Generation, ApiError> {
        let max = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            _ => None,
        };
        let max_tokens = match max {
            Some((name, v)) if v < 1 => {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("Invalid '{name}': {v}; it must be at least 1."),
                ))
            }
            Some((_, v)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
            None => None,
        };
        let max_tokens_param = max.map_or("max_tokens", |(name, _)| name);
        let mut p = SamplingParams {
            // OpenAI's default temperature is 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            // OpenAI's penalties look at the generated tokens only.
            penalty_last_n: 0,
            penalize_prompt: false,
            ..SamplingParams::default()
        };
        range("temperature", p.temperature, 0.0, 2.0)?;
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("Invalid 'top_p': {}; it must be in (0, 1].", p.top_p),
            ));
        }
        range("min_p", p.min_p, 0.0, 1.0)?;
        range("frequency_penalty", p.frequency_penalty, -2.0, 2.0)?;
        range("presence_penalty", p.presence_penalty, -2.0, 2.0)?;
        if !(p.repetition_penalty > 0.0 && p.repetition_penalty <= 10.0) {
            return Err(ApiError::invalid(
                Some("repetition_penalty"),
                format!(
                    "Invalid 'repetition_penalty': {}; it must be in (0, 10].",
                    p.repetition_penalty
                ),
            ));
        }
        p.top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    format!("Invalid 'top_k': {k}; it must be -1 (off) or positive."),
                ))
            }
        };
        if let Some(bias) = &self.logit_bias {
            for (k, &v) in bias {
                let id = k.parse::<u32>().ok().filter(|&id| (id as usize) < vocab);
                let Some(id) = id else {
                    return Err(ApiError::invalid(
                        Some("logit_bias"),
                        format!("Invalid 'logit_bias': key {k:?} is not a token id below {vocab}."),
                    ));
                };
                range("logit_bias", v, -100.0, 100.0)?;
                p.logit_bias.push((id, v));
            }
            p.logit_bias.sort_by_key(|b| b.0);
        }
        let n = self.n.unwrap_or(1);
        if !(1..=128).contains(&n) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("Invalid 'n': {n}; it must be between 1 and 128."),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("Invalid 'stop': {} sequences given; at most 4.", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                Some("stop"),
                "Invalid 'stop': a stop sequence may not be empty.",
            ));
        }
        let base = seed(self);
        let params = (0..n as u64)
            .map(|i| SamplingParams {
                seed: base.wrapping_add(i),
                ..p.clone()
            })
            .collect();
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "Invalid 'stream_options': only allowed when 'stream' is true.",
            ));
        }
        Ok(Generation {
            params,
            max_tokens,
            max_tokens_param,
            stop,
            stream,
            include_usage,
            logprobs,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

impl ChatFields {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        fields(body)
    }

    /// `logprobs` / `top_logprobs` as the engine wants them.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if !(0..=20).contains(&top) {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                format!("Invalid 'top_logprobs': {top}; it must be between 0 and 20."),
            ));
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as usize)),
            _ if self.top_logprobs.is_some() && top > 0 => Err(ApiError::invalid(
                Some("top_logprobs"),
                "'top_logprobs' requires 'logprobs' to be true.",
            )),
            _ => Ok(None),
        }
    }

    /// The conversation as the chat template sees it.
    pub fn messages(&self) -> Result<Vec<hearth_models::ChatMessage>, ApiError> {
        let Some(messages) = &self.messages else {
            return Err(ApiError::invalid(
                Some("messages"),
                "Missing required parameter: 'messages'.",
            ));
        };
        if messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "Invalid 'messages': empty array. Expected an array with at least one message.",
            ));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::invalid(
                        Some(&format!("messages[{i}].role")),
                        format!("Invalid 'messages[{i}].role': {:?} is not supported; use system, developer, user, assistant or tool.", crate::error::excerpt(other)),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    Some(&format!("messages[{i}].content[{j}]")),
                                    format!("Invalid 'messages[{i}].content[{j}]': only text parts are supported, got type {:?}.", p.kind),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let mut msg = hearth_models::ChatMessage::new(role, content);
            if role == "tool" {
                let Some(id) = &m.tool_call_id else {
                    return Err(ApiError::invalid(
                        Some(&format!("messages[{i}].tool_call_id")),
                        format!("Missing required parameter: 'messages[{i}].tool_call_id'."),
                    ));
                };
                msg.tool_call_id = Some(id.clone());
            }
            if let Some(calls) = m.tool_calls.as_ref().filter(|_| role == "assistant") {
                let mut list = Vec::with_capacity(calls.len());
                for (j, c) in calls.iter().enumerate() {
                    // Templates want the arguments as an object, not JSON text.
                    let args: serde_json::Value = serde_json::from_str(&c.function.arguments)
                        .map_err(|e| {
                            let p = format!("messages[{i}].tool_calls[{j}].function.arguments");
                            ApiError::invalid(Some(&p), format!("Invalid '{p}': not JSON: {e}"))
                        })?;
                    list.push(serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": args},
                    }));
                }
                msg.tool_calls = Some(list);
            }
            msg.name = m.name.clone();
            out.push(msg);
        }
        Ok(out)
    }
}

impl CompletionFields {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let f: Self = fields(body)?;
        if f.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                Some("suffix"),
                "'suffix' is not supported by this model.",
            ));
        }
        Ok(f)
    }

    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(n) if (0..=5).contains(&n) => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::invalid(
                Some("logprobs"),
                format!("Invalid 'logprobs': {n}; it must be between 0 and 5."),
            )),
        }
    }

    /// The prompts: one per choice group. Text is tokenized by the caller.
    pub fn prompts(&self) -> Result<Vec<PromptInput>, ApiError> {
        let missing = || ApiError::invalid(Some("prompt"), "Missing required parameter: 'prompt'.");
        let out = match self.prompt.as_ref().ok_or_else(missing)? {
            Prompt::Text(t) => vec![PromptInput::Text(t.clone())],
            Prompt::Texts(v) => v.iter().cloned().map(PromptInput::Text).collect(),
            Prompt::Tokens(v) => vec![PromptInput::Tokens(v.clone())],
            Prompt::TokenLists(v) => v.iter().cloned().map(PromptInput::Tokens).collect(),
        };
        if out.is_empty() {
            return Err(ApiError::invalid(
                Some("prompt"),
                "Invalid 'prompt': empty array.",
            ));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn common(v: Value) -> Result<Generation, ApiError> {
        CommonFields::parse(&v)?.generation(None, 100)
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (body, param) in [
            (json!({"temperature": 3.0}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"logit_bias": {"100": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (json!({"presence_penalty": -2.5}), "presence_penalty"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ] {
            let e = common(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn defaults_and_choices() {
        let g = common(json!({"n": 3, "seed": 7, "stop": "\n"})).unwrap();
        assert_eq!(g.params.len(), 3);
        assert_eq!(g.params[2].seed, 9);
        assert_eq!(g.params[0].temperature, 1.0);
        assert_eq!(g.stop, vec!["\n"]);
        assert_eq!(g.max_tokens, None);
    }

    #[test]
    fn chat_messages_are_checked() {
        let f = ChatFields::parse(&json!({})).unwrap();
        assert_eq!(f.messages().unwrap_err().param.as_deref(), Some("messages"));
        let f =
            ChatFields::parse(&json!({"messages": [{"role": "robot", "content": "x"}]})).unwrap();
        assert_eq!(
            f.messages().unwrap_err().param.as_deref(),
            Some("messages[0].role")
        );
        let f = ChatFields::parse(&json!({"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}
        ]}))
        .unwrap();
        let m = f.messages().unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[1].content.as_str()),
            ("system", "Hi!")
        );
        let e = ChatFields::parse(&json!({"messages": 5})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }
}
