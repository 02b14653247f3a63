//! Structured output on the wire: `response_format` (`text`, `json_object`,
//! `json_schema`), our `grammar` (Lark) and `regex` extensions (and vLLM's `guided_*`
//! names for them), and `tools` / `tool_choice` / `parallel_tool_calls`. Everything is
//! checked here; what comes out is a grammar for the engine and, with tools, the format
//! to read calls back in.

use hearth_engine::Grammar;
use hearth_models::{ToolChoice, ToolFormat, ToolSpec};
use serde_json::{json, Value};

use crate::error::{excerpt, ApiError};

/// The output constraint of a request, before it is compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    pub grammar: Option<Grammar>,
    /// The request parameter the grammar came from, for error messages.
    pub param: &'static str,
}

/// Tools offered in a chat request.
#[derive(Debug, Clone)]
pub struct Tools {
    /// As the client sent them, for the chat template.
    pub raw: Vec<Value>,
    pub specs: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// Most strings `guided_choice` may list (as OpenAI bounds a strict schema's enum
/// values); their total size is bounded by the grammar size limit too.
pub const MAX_CHOICES: usize = 1000;

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param), message)
}

/// Reads `response_format`, `grammar`, `regex` and vLLM's `guided_json`,
/// `guided_regex`, `guided_grammar`, `guided_choice`. At most one may constrain.
pub fn output_spec(body: &Value) -> Result<OutputSpec, ApiError> {
    let mut found: Vec<(&'static str, Grammar)> = Vec::new();
    if let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) {
        if let Some(g) = response_format(rf)? {
            found.push(("response_format", g));
        }
    }
    let text = |name: &'static str| -> Result<Option<String>, ApiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(invalid(
                name,
                format!("Invalid '{name}': expected a non-empty string."),
            )),
        }
    };
    for name in ["grammar", "guided_grammar"] {
        if let Some(g) = text(name)? {
            found.push((name, Grammar::Lark(g)));
        }
    }
    for name in ["regex", "guided_regex"] {
        if let Some(r) = text(name)? {
            found.push((name, Grammar::Regex(r)));
        }
    }
    match body.get("guided_json") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            let v = serde_json::from_str(s).map_err(|e| {
                invalid(
                    "guided_json",
                    format!("Invalid 'guided_json': not JSON: {e}"),
                )
            })?;
            found.push(("guided_json", Grammar::JsonSchema(v)));
        }
        Some(v @ Value::Object(_)) => found.push(("guided_json", Grammar::JsonSchema(v.clone()))),
        Some(_) => {
            return Err(invalid(
                "guided_json",
                "Invalid 'guided_json': expected a JSON schema object.",
            ))
        }
    }
    match body.get("guided_choice") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.len() > MAX_CHOICES => {
            return Err(invalid(
                "guided_choice",
                format!(
                    "Invalid 'guided_choice': {} choices given; at most {MAX_CHOICES}.",
                    items.len()
                ),
            ))
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
            found.push(("guided_choice", choice_grammar(items)));
        }
        Some(_) => {
            return Err(invalid(
                "guided_choice",
                "Invalid 'guided_choice': expected a non-empty array of strings.",
            ))
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|f| f.0).collect();
        return Err(invalid(
            names[1],
            format!(
                "Only one output constraint may be given; this request has {}.",
                names.join(", ")
            ),
        ));
    }
    Ok(match found.pop() {
        Some((param, g)) => OutputSpec {
            grammar: Some(g),
            param,
        },
        None => OutputSpec {
            grammar: None,
            param: "response_format",
        },
    })
}

/// `guided_choice`: exactly one of the strings, as bare text.
fn choice_grammar(items: &[Value]) -> Grammar {
    let alts: Vec<String> = items
        .iter()
        .filter_map(Value::as_str)
        .map(|s| Value::from(s).to_string())
        .collect();
    Grammar::Lark(format!("start: {}", alts.join(" | ")))
}

fn response_format(rf: &Value) -> Result<Option<Grammar>, ApiError> {
    let p = "response_format";
    let Some(obj) = rf.as_object() else {
        return Err(invalid(p, "Invalid 'response_format': expected an object."));
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let Some(js) = obj.get("json_schema").and_then(Value::as_object) else {
                return Err(invalid(
                    "response_format.json_schema",
                    "Missing required parameter: 'response_format.json_schema'.",
                ));
            };
            match js.get("name").and_then(Value::as_str) {
                Some(n) if valid_name(n) => {}
                Some(n) => return Err(invalid(
                    "response_format.json_schema.name",
                    format!("Invalid 'response_format.json_schema.name': {:?}; use at most 64 letters, digits, underscores and dashes.", excerpt(n)),
                )),
                None => return Err(invalid(
                    "response_format.json_schema.name",
                    "Missing required parameter: 'response_format.json_schema.name'.",
                )),
            }
            match js.get("schema") {
                // No schema: any JSON object, as OpenAI's own default.
                None | Some(Value::Null) => Ok(Some(Grammar::JsonObject)),
                Some(s @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(Some(Grammar::JsonSchema(s.clone())))
                }
                Some(_) => Err(invalid(
                    "response_format.json_schema.schema",
                    "Invalid 'response_format.json_schema.schema': expected a JSON schema object.",
                )),
            }
        }
        Some(other) => Err(invalid(
            "response_format.type",
            format!("Invalid 'response_format.type': {:?}; expected 'text', 'json_object' or 'json_schema'.", excerpt(other)),
        )),
        None => Err(invalid(
            "response_format.type",
            "Missing required parameter: 'response_format.type'.",
        )),
    }
}

/// Function names as OpenAI allows them.
fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools are
/// offered.
pub fn tools(body: &Value) -> Result<Option<Tools>, ApiError> {
    let choice_raw = body.get("tool_choice").filter(|v| !v.is_null());
    let list = match body.get("tools") {
        None | Some(Value::Null) => {
            if let Some(c) = choice_raw {
                if c != "none" {
                    return Err(invalid(
                        "tool_choice",
                        "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                    ));
                }
            }
            return Ok(None);
        }
        Some(Value::Array(list)) => list,
        Some(_) => return Err(invalid("tools", "Invalid 'tools': expected an array.")),
    };
    if list.len() > 128 {
        return Err(invalid(
            "tools",
            format!("Invalid 'tools': {} tools given; at most 128.", list.len()),
        ));
    }
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let here = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                &format!("{here}.type"),
                format!("Invalid '{here}.type': only 'function' tools are supported."),
            ));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(invalid(
                &format!("{here}.function"),
                format!("Missing required parameter: '{here}.function'."),
            ));
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n) if valid_name(n) => n.to_owned(),
            Some(n) => return Err(invalid(
                &format!("{here}.function.name"),
                format!("Invalid '{here}.function.name': {:?}; use at most 64 letters, digits, underscores and dashes.", excerpt(n)),
            )),
            None => {
                return Err(invalid(
                    &format!("{here}.function.name"),
                    format!("Missing required parameter: '{here}.function.name'."),
                ))
            }
        };
        if specs.iter().any(|s| s.name == name) {
            return Err(invalid(
                &format!("{here}.function.name"),
                format!("Invalid 'tools': the function name {name:?} appears twice."),
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(invalid(
                    &format!("{here}.function.parameters"),
                    format!("Invalid '{here}.function.parameters': expected a JSON schema object."),
                ))
            }
        };
        let strict = f.get("strict").and_then(Value::as_bool).unwrap_or(false);
        specs.push(ToolSpec {
            name,
            parameters,
            strict,
        });
    }
    let choice = match choice_raw {
        None if specs.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(invalid(
                "tool_choice",
                format!("Invalid 'tool_choice': {:?}; expected 'none', 'auto', 'required' or a function.", excerpt(other)),
            )),
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (v.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) if specs.iter().any(|s| s.name == n) => {
                    ToolChoice::Function(n.to_owned())
                }
                (Some("function"), Some(n)) => {
                    return Err(invalid(
                        "tool_choice",
                        format!("Invalid 'tool_choice': no tool named {:?} was given in 'tools'.", excerpt(n)),
                    ))
                }
                _ => return Err(invalid(
                    "tool_choice",
                    "Invalid 'tool_choice': expected 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                )),
            }
        }
    };
    if specs.is_empty() && choice != ToolChoice::None {
        return Err(invalid(
            "tools",
            "Invalid 'tools': empty array. Expected an array with at least one tool.",
        ));
    }
    let parallel = match body.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(invalid(
                "parallel_tool_calls",
                "Invalid 'parallel_tool_calls': expected a boolean.",
            ))
        }
    };
    Ok(Some(Tools {
        raw: list.clone(),
        specs,
        choice,
        parallel,
    }))
}

impl Tools {
    /// Calls are expected (and parsed out of the reply).
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar for the reply in the model's `format`; `mistral_token` spells the
    /// `[TOOL_CALLS]` control token where the tokenizer has one.
    pub fn grammar(&self, format: ToolFormat, mistral_token: Option<&str>) -> Option<Grammar> {
        format
            .grammar(&self.specs, &self.choice, self.parallel, mistral_token)
            .map(Grammar::Lark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        r.unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn response_formats_become_grammars() {
        let spec = |v: Value| output_spec(&v).unwrap().grammar;
        assert_eq!(spec(json!({})), None);
        assert_eq!(spec(json!({"response_format": {"type": "text"}})), None);
        assert_eq!(
            spec(json!({"response_format": {"type": "json_object"}})),
            Some(Grammar::JsonObject)
        );
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            spec(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}})
            ),
            Some(Grammar::JsonSchema(s))
        );
        assert_eq!(
            spec(json!({"regex": "[0-9]+"})),
            Some(Grammar::Regex("[0-9]+".into()))
        );
        assert_eq!(
            spec(json!({"guided_choice": ["yes", "no"]})),
            Some(Grammar::Lark("start: \"yes\" | \"no\"".into()))
        );
        for (body, param) in [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (json!({"response_format": "json"}), "response_format"),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"grammar": 5}), "grammar"),
            (
                json!({"regex": "a", "response_format": {"type": "json_object"}}),
                "regex",
            ),
        ] {
            assert_eq!(param_of(output_spec(&body)), param, "{body}");
        }
    }

    #[test]
    fn tools_are_checked() {
        let f = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
        let t = tools(&json!({"tools": [f]})).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel && t.active());
        let t = tools(&json!({"tools": [f], "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": false}))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Function("f".into()));
        assert!(!t.parallel);
        assert!(tools(&json!({"tool_choice": "none"})).unwrap().is_none());
        for (body, param) in [
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"tools": {}}), "tools"),
            (json!({"tools": [{"type": "code"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"tools": [f, f]}), "tools[1].function.name"),
            (
                json!({"tools": [f], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [f], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (json!({"tools": [], "tool_choice": "required"}), "tools"),
            (
                json!({"tools": [f], "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
        ] {
            assert_eq!(param_of(tools(&body)), param, "{body}");
        }
    }
}
