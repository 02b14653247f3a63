//! The model's own chat template (`tokenizer.chat_template`), rendered with minijinja.
//!
//! Templates are written for Python's Jinja2 as Hugging Face runs it: `trim_blocks` and
//! `lstrip_blocks` on, Python string/dict methods (`.strip()`, `.items()`, …) available,
//! and helpers `raise_exception` and `strftime_now`.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use crate::tools::{hermes_call_text, hermes_system_prompt, ToolFormat};

/// One chat message as the template sees it.
#[derive(Clone, Debug, Serialize, PartialEq, Default)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, as templates expect them:
    /// `[{"id", "type": "function", "function": {"name", "arguments": {..}}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    #[error("the chat template failed to render: {0}")]
    Render(String),
}

/// A compiled chat template with the bos/eos strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
    /// The template renders `tools` and tool turns itself.
    pub supports_tools: bool,
    /// How the model writes tool calls.
    pub tool_format: ToolFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const NAME: &str = "chat";

/// ChatML, used when a model ships no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            supports_tools: source.contains("tools"),
            tool_format: ToolFormat::detect(source),
        })
    }

    /// Renders `messages` into a prompt; with `add_generation_prompt` the prompt ends
    /// where the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders a conversation that may offer `tools` (OpenAI's `tools` array) and hold
    /// tool calls and results. A template that knows no tools gets them in Hermes form:
    /// the tool list in the system message, calls as `<tool_call>` blocks, results as
    /// `<tool_response>` blocks in a user turn.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let uses_tools = !tools.is_empty()
            || messages
                .iter()
                .any(|m| m.tool_calls.is_some() || m.role == "tool");
        let hermes;
        let messages = if uses_tools && !self.supports_tools {
            hermes = hermes_messages(messages, tools);
            &hermes[..]
        } else {
            messages
        };
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        let tools = (!tools.is_empty() && self.supports_tools).then_some(tools);
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            ChatTemplateError::Render(msg)
        })
    }
}

/// A tool conversation rewritten in Hermes form for a template that knows only roles
/// and text.
fn hermes_messages(messages: &[ChatMessage], tools: &[serde_json::Value]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let prompt = hermes_system_prompt(tools);
        match messages.first() {
            Some(m) if m.role == "system" => out.push(ChatMessage::new(
                "system",
                format!("{}\n\n{prompt}", m.content),
            )),
            _ => out.push(ChatMessage::new("system", prompt)),
        }
    }
    let skip =
        usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if m.tool_calls.is_some() => {
                let mut text = m.content.clone();
                for call in m.tool_calls.iter().flatten() {
                    let f = call.get("function").unwrap_or(call);
                    let name = f.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                    let args = f.get("arguments").cloned().unwrap_or_default();
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&hermes_call_text(name, &args));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
                // Results of one turn's calls share one user message.
                match out.last_mut() {
                    Some(last)
                        if last.role == "user" && last.content.ends_with("</tool_response>") =>
                    {
                        last.content.push('\n');
                        last.content.push_str(&block);
                    }
                    _ => out.push(ChatMessage::new("user", block)),
                }
            }
            _ => out.push(ChatMessage::new(m.role.clone(), m.content.clone())),
        }
    }
    out
}

/// `strftime_now(format)`: the current UTC date, for templates that print today's date.
/// Supports the common `%d %m %Y %b %B %y %H %M %S` directives.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    format_utc(secs, &format)
}

fn format_utc(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    ChatMessage::new("system", "S"),
                    ChatMessage::new("user", "U"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], false)
            .unwrap();
        assert_eq!(out, "<s>[USER] hi");
        let err = t
            .render(&[ChatMessage::new("robot", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("bad role robot"), "{err}");
    }

    /// A template with tool support (shaped like Qwen2.5's) gets `tools` and the tool
    /// turns as they are; one without gets them rewritten in Hermes form.
    #[test]
    fn tools_render_natively_or_in_hermes_form() {
        // Keys in sorted order: serde_json keeps insertion order when another crate of
        // the workspace turns on `preserve_order`, sorted order otherwise.
        let tool = serde_json::json!({"function": {"name": "f", "parameters": {"type": "object"}}, "type": "function"});
        let call = serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}});
        let mut asked = ChatMessage::new("assistant", "");
        asked.tool_calls = Some(vec![call]);
        let mut result = ChatMessage::new("tool", "42");
        result.tool_call_id = Some("call_1".into());
        let messages = vec![ChatMessage::new("user", "go"), asked, result];

        let native = "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}{% endfor %}</tools>{% endif %}{% for m in messages %}[{{ m.role }}]{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }}{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}{% if m.role == 'tool' %}({{ m.tool_call_id }}){% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(native, "", "").unwrap();
        assert!(t.supports_tools);
        assert_eq!(t.tool_format, ToolFormat::Hermes);
        let out = t
            .render_with_tools(&messages, std::slice::from_ref(&tool), false)
            .unwrap();
        assert_eq!(
            out,
            r#"<tools>f</tools>[user]go[assistant]<tool_call>f{"x":1}</tool_call>[tool](call_1)42"#
        );

        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        assert!(!t.supports_tools);
        let out = t.render_with_tools(&messages, &[tool], true).unwrap();
        assert!(out.starts_with("<|im_start|>system\n# Tools\n"), "{out}");
        assert!(
            out.contains(
                r#"<tools>
{"function": {"name": "f", "parameters": {"type": "object"}}, "type": "function"}
</tools>"#
            ),
            "{out}"
        );
        assert!(out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call><|im_end|>"), "{out}");
        assert!(
            out.contains("<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>"),
            "{out}"
        );
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }

    #[test]
    fn formats_dates() {
        // 2024-02-29 13:05:09 UTC
        assert_eq!(
            format_utc(1_709_211_909, "%d %b %Y %H:%M:%S"),
            "29 Feb 2024 13:05:09"
        );
        assert_eq!(format_utc(0, "%B %d, %Y"), "January 01, 1970");
    }
}
