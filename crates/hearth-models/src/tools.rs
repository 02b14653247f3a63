//! Tool calling in the model's own words: how a model family writes a call (Hermes
//! `<tool_call>` JSON for Qwen, SmolLM and most ChatML models; Llama 3.x bare JSON with
//! `parameters`; Mistral `[TOOL_CALLS]` lists), the grammar that makes it write one
//! correctly (llguidance's Lark dialect, with each function's arguments constrained to
//! its JSON schema), and the parser that reads calls back out of the text, whole or as
//! it streams.

use serde_json::{json, Value};

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
    /// Refuse schema keywords the grammar cannot enforce (OpenAI's `strict`); without
    /// it they are ignored and the rest of the schema is enforced.
    pub strict: bool,
}

/// What the client allows (`tool_choice`).
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// Never call (tools are still shown to the model, as OpenAI does).
    None,
    /// The model decides: text, or calls.
    Auto,
    /// At least one call, no text.
    Required,
    /// Exactly one call of this function.
    Function(String),
}

/// How a model family writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one block per call.
    Hermes,
    /// `{"name": "f", "parameters": {...}}` as the whole reply (one call).
    Llama3,
    /// `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`.
    Mistral,
}

/// A call read back from the model's text.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as compact JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template expects, from its source. Templates that know no
    /// tools get Hermes, which [`hermes_system_prompt`] explains to the model.
    pub fn detect(template: &str) -> Self {
        if template.contains(MISTRAL_OPEN) {
            ToolFormat::Mistral
        } else if template.contains(HERMES_OPEN) {
            ToolFormat::Hermes
        } else if template.contains("<|start_header_id|>") && template.contains("tools") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }

    /// Whether several calls fit in one reply.
    pub fn parallel(self) -> bool {
        !matches!(self, ToolFormat::Llama3)
    }

    /// The grammar (Lark) the reply must follow, or `None` when it is free
    /// (`tool_choice: none`). `special` names how the grammar spells a control token
    /// (Mistral's `[TOOL_CALLS]` is one in its tokenizer): give `Some("<[id]>")` for it.
    pub fn grammar(
        self,
        tools: &[ToolSpec],
        choice: &ToolChoice,
        parallel: bool,
        mistral_token: Option<&str>,
    ) -> Option<String> {
        let chosen: Vec<&ToolSpec> = match choice {
            ToolChoice::None => return None,
            ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
            _ => tools.iter().collect(),
        };
        let args_key = match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        };
        let mut g = String::new();
        let mut alts = Vec::new();
        for (i, t) in chosen.iter().enumerate() {
            let schema = json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, args_key: strict_schema(&t.parameters)},
                "required": ["name", args_key],
                "additionalProperties": false,
                "x-guidance": {
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                    "lenient": !t.strict,
                },
            });
            g.push_str(&format!("fn_{i}: %json {schema}\n"));
            alts.push(format!("fn_{i}"));
        }
        g.push_str(&format!("call: {}\n", alts.join(" | ")));
        let single = matches!(choice, ToolChoice::Function(_)) || !parallel || !self.parallel();
        let auto = *choice == ToolChoice::Auto;
        g.push_str("TEXT: /(?s:.*)/\n");
        match self {
            ToolFormat::Hermes => {
                g.push_str("block: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n");
                g.push_str("first: head \"\\n\" call \"\\n</tool_call>\"\n");
                g.push_str("head[lazy]: /(?s:.*)<tool_call>/\n");
                let rest = if single { "" } else { " (\"\\n\" block)*" };
                if auto {
                    g.push_str(&format!("start: TEXT | first{rest}\n"));
                } else {
                    g.push_str(&format!("start: block{rest}\n"));
                }
            }
            ToolFormat::Llama3 => {
                if auto {
                    // A reply that starts with `{` is a call; anything else is text.
                    g.push_str("PLAIN: /(?s:[^{<].*)?/\n");
                    g.push_str("start: PLAIN | call | \"<|python_tag|>\" call\n");
                } else {
                    g.push_str("start: call\n");
                }
            }
            ToolFormat::Mistral => {
                let open = mistral_token.map_or_else(|| "\"[TOOL_CALLS]\"".into(), str::to_owned);
                let rest = if single { "" } else { " (\", \" call)*" };
                g.push_str(&format!("calls: {open} \"[\" call{rest} \"]\"\n"));
                if auto {
                    g.push_str("PLAIN: /(?s:[^\\[].*)?/\n");
                    g.push_str("start: PLAIN | calls\n");
                } else {
                    g.push_str("start: calls\n");
                }
            }
        }
        Some(g)
    }
}

/// A JSON schema read strictly, as OpenAI's strict mode and xgrammar do: an object
/// schema that lists `properties` and says nothing of `additionalProperties` allows no
/// others (without this a small model fills objects with keys nobody asked for), and
/// `time` / `date-time` strings stop after nine digits of fractional seconds, hostnames
/// at 253 bytes, emails come from a plain subset with bounded parts, and integers
/// without bounds stay within ±2^53−1.
pub fn strict_schema(schema: &Value) -> Value {
    let mut s = schema.clone();
    make_strict(&mut s, 0);
    s
}

/// Addresses like `first.last+tag@mail.example.org`: at most 64 bytes before the `@`,
/// labels of 1–22 characters not starting or ending with `-`.
const EMAIL_PATTERN: &str = r"^[A-Za-z0-9_%+-]{1,32}(\.[A-Za-z0-9_%+-]{1,15}){0,2}@[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?){0,3}\.[A-Za-z]{2,10}$";

fn make_strict(v: &mut Value, depth: usize) {
    if depth > 64 {
        return;
    }
    match v {
        Value::Object(obj) => {
            if obj.contains_key("properties") && !obj.contains_key("additionalProperties") {
                obj.insert("additionalProperties".into(), Value::Bool(false));
            }
            // RFC 3339 lets fractional seconds run on forever, and a small model will;
            // nine digits (nanoseconds) is as precise as anyone stores.
            let longest = match obj.get("format").and_then(Value::as_str) {
                Some("date-time") => Some(35), // 2024-01-02T03:04:05.123456789+05:30
                Some("time") => Some(24),      // 03:04:05.123456789+05:30
                Some("hostname") => Some(253), // RFC 1035
                _ => None,
            };
            // llguidance's email format bounds no part of the address; validators hold
            // the local part to 64 bytes (RFC 5321). Generate from a plain subset that
            // every validator accepts instead.
            if obj.get("format").and_then(Value::as_str) == Some("email")
                && !obj.contains_key("pattern")
            {
                obj.remove("format");
                obj.insert("pattern".into(), Value::from(EMAIL_PATTERN));
            }
            if let Some(n) = longest {
                obj.entry("maxLength").or_insert(Value::from(n));
            }
            // Unbounded integers let a small model repeat a digit until max_tokens;
            // bound them to the range JSON parsers agree on (I-JSON, RFC 7493: ±2^53−1).
            let integer = match obj.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                const SAFE: i64 = (1 << 53) - 1;
                if !obj.contains_key("minimum") && !obj.contains_key("exclusiveMinimum") {
                    obj.insert("minimum".into(), Value::from(-SAFE));
                }
                if !obj.contains_key("maximum") && !obj.contains_key("exclusiveMaximum") {
                    obj.insert("maximum".into(), Value::from(SAFE));
                }
            }
            for (key, child) in obj.iter_mut() {
                match key.as_str() {
                    // Maps of name → schema.
                    "properties" | "$defs" | "definitions" | "patternProperties" => {
                        if let Value::Object(m) = child {
                            for sub in m.values_mut() {
                                make_strict(sub, depth + 1);
                            }
                        }
                    }
                    // A schema or a list of schemas.
                    "items"
                    | "prefixItems"
                    | "anyOf"
                    | "oneOf"
                    | "allOf"
                    | "additionalProperties"
                    | "additionalItems" => make_strict(child, depth + 1),
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                make_strict(item, depth + 1);
            }
        }
        _ => {}
    }
}

/// The system text that teaches a model whose template knows no tools to call them,
/// in Hermes form (as Qwen2.5's template words it).
pub fn hermes_system_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        s.push('\n');
        s.push_str(&dumps(t));
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// One call as Hermes writes it (and as our grammar lays it out), for replaying an
/// assistant turn.
pub fn hermes_call_text(name: &str, arguments: &Value) -> String {
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
        Value::from(name),
        dumps(arguments)
    )
}

/// JSON as Python's `json.dumps` writes it: `{"a": 1, "b": [2, 3]}`.
pub fn dumps(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), dumps(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(dumps).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// What a reply's text becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolPiece {
    Text(String),
    /// A whole call.
    Call(ToolCall),
    /// A call begins (its arguments follow as [`ToolPiece::Args`] fragments).
    Begin {
        name: String,
    },
    /// More of the current call's arguments (JSON text).
    Args(String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hermes {
    /// Waiting for `{"name": "NAME", "arguments": `.
    Head,
    /// Inside the arguments: JSON nesting so far.
    Args {
        depth: usize,
        in_str: bool,
        escaped: bool,
    },
    /// After the arguments, until `</tool_call>`.
    Tail,
    /// Not the usual layout: read the call whole.
    Whole,
}

/// Text and calls of a whole reply, calls streamed in pieces put back together.
pub fn collect_pieces(pieces: Vec<ToolPiece>) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for p in pieces {
        match p {
            ToolPiece::Text(t) => text.push_str(&t),
            ToolPiece::Call(c) => calls.push(c),
            ToolPiece::Begin { name } => calls.push(ToolCall {
                name,
                arguments: String::new(),
            }),
            ToolPiece::Args(a) => {
                if let Some(c) = calls.last_mut() {
                    c.arguments.push_str(&a);
                }
            }
        }
    }
    (text, calls)
}

/// Reads a reply as it streams: text goes out as soon as it cannot be the start of a
/// call; a call goes out once it is complete. Text that looks like a call but does not
/// parse is passed on as text, so nothing is lost.
#[derive(Debug)]
pub struct ToolParser {
    format: ToolFormat,
    buf: String,
    in_call: bool,
    /// How far a Hermes call in the usual layout has been streamed.
    hermes: Hermes,
    /// Nothing but whitespace has been released yet.
    at_start: bool,
}

impl ToolParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            buf: String::new(),
            in_call: false,
            hermes: Hermes::Head,
            at_start: true,
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolPiece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.drain(&mut out, false);
        out
    }

    /// The reply ended: whatever is held goes out.
    pub fn finish(&mut self) -> Vec<ToolPiece> {
        let mut out = Vec::new();
        self.drain(&mut out, true);
        out
    }

    fn drain(&mut self, out: &mut Vec<ToolPiece>, end: bool) {
        loop {
            if self.in_call && self.format == ToolFormat::Hermes && self.hermes != Hermes::Whole {
                if !self.stream_hermes(out, end) {
                    return;
                }
                continue;
            }
            if self.in_call {
                let done = match self.format {
                    ToolFormat::Hermes => self.buf.find(HERMES_CLOSE).map(|at| {
                        let body = self.buf[..at].to_owned();
                        self.buf.drain(..at + HERMES_CLOSE.len());
                        body
                    }),
                    // These run to the end of the reply.
                    _ if end => Some(std::mem::take(&mut self.buf)),
                    _ => None,
                };
                let Some(body) = done.or_else(|| end.then(|| std::mem::take(&mut self.buf))) else {
                    return;
                };
                self.in_call = false;
                self.hermes = Hermes::Head;
                match self.parse_calls(&body) {
                    Some(calls) => out.extend(calls.into_iter().map(ToolPiece::Call)),
                    None => push_text(out, self.opener_for(&body)),
                }
                if self.format == ToolFormat::Hermes {
                    // Whitespace between calls is not text.
                    let trimmed = self.buf.trim_start().len();
                    if trimmed == 0 && !end {
                        return;
                    }
                    if self.buf[self.buf.len() - trimmed..].starts_with('<') || trimmed == 0 {
                        self.buf.drain(..self.buf.len() - trimmed);
                    }
                }
                continue;
            }
            let (found, hold) = self.find_open();
            if let Some((at, len)) = found {
                let before = self.buf[..at].to_owned();
                self.buf.drain(..at + len);
                push_text(out, trim_end_newlines(&before).to_owned());
                self.in_call = true;
                continue;
            }
            // Whitespace before a call is not text either: hold it too.
            let keep = if end {
                0
            } else {
                let body = &self.buf[..self.buf.len() - hold];
                hold + (body.len() - body.trim_end().len())
            };
            let cut = self.buf.len() - keep;
            let text: String = self.buf.drain(..cut).collect();
            if !text.trim().is_empty() {
                self.at_start = false;
            }
            push_text(out, text);
            return;
        }
    }

    /// Streams a Hermes call written as `{"name": "NAME", "arguments": {...}}` (the
    /// layout our grammar makes): `Begin` once the name is known, then the arguments as
    /// they come. Any other layout falls back to reading the call whole. Returns false
    /// when it needs more text.
    fn stream_hermes(&mut self, out: &mut Vec<ToolPiece>, end: bool) -> bool {
        const NAME: &str = "{\"name\": \"";
        const ARGS: &str = "\", \"arguments\": ";
        match self.hermes {
            Hermes::Head => {
                let lead = self.buf.len() - self.buf.trim_start().len();
                let t = &self.buf[lead..];
                let head = t.strip_prefix(NAME).and_then(|rest| {
                    let close = rest.find(['"', '\\'])?;
                    let after = &rest[close..];
                    after
                        .starts_with(ARGS)
                        .then(|| {
                            (
                                rest[..close].to_owned(),
                                lead + NAME.len() + close + ARGS.len(),
                            )
                        })
                        .filter(|_| after.starts_with('"'))
                });
                // Stream only object arguments (a model may write them as a string).
                let head = match head {
                    Some((_, used)) if self.buf.len() == used && !end => return false,
                    Some((name, used)) if self.buf[used..].starts_with('{') => Some((name, used)),
                    _ => None,
                };
                if let Some((name, used)) = head {
                    self.buf.drain(..used);
                    out.push(ToolPiece::Begin { name });
                    self.hermes = Hermes::Args {
                        depth: 0,
                        in_str: false,
                        escaped: false,
                    };
                    return true;
                }
                // Could it still become the usual layout?
                let could = match t.strip_prefix(NAME) {
                    None => NAME.starts_with(t),
                    Some(rest) => match rest.find(['"', '\\']) {
                        None => true,
                        Some(c) => rest[c..].starts_with('"') && ARGS.starts_with(&rest[c..]),
                    },
                };
                if could && !end {
                    return false;
                }
                self.hermes = Hermes::Whole;
                true
            }
            Hermes::Args {
                mut depth,
                mut in_str,
                mut escaped,
            } => {
                let mut done = None;
                for (i, c) in self.buf.char_indices() {
                    if in_str {
                        match c {
                            _ if escaped => escaped = false,
                            '\\' => escaped = true,
                            '"' => in_str = false,
                            _ => {}
                        }
                        continue;
                    }
                    match c {
                        '"' => in_str = true,
                        '{' | '[' => depth += 1,
                        '}' | ']' if depth > 0 => {
                            depth -= 1;
                            if depth == 0 {
                                done = Some(i + 1);
                                break;
                            }
                        }
                        // The call's own closing brace after scalar arguments.
                        '}' => {
                            done = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let cut = done.unwrap_or(self.buf.len());
                let frag: String = self.buf.drain(..cut).collect();
                if !frag.is_empty() {
                    out.push(ToolPiece::Args(frag));
                }
                if done.is_some() {
                    self.hermes = Hermes::Tail;
                    return true;
                }
                self.hermes = Hermes::Args {
                    depth,
                    in_str,
                    escaped,
                };
                if end {
                    self.buf.clear();
                    self.in_call = false;
                    self.hermes = Hermes::Head;
                }
                end
            }
            Hermes::Tail => {
                // The call's closing brace and `</tool_call>`.
                match self.buf.find(HERMES_CLOSE) {
                    Some(at) => {
                        self.buf.drain(..at + HERMES_CLOSE.len());
                        let trimmed = self.buf.trim_start().len();
                        self.buf.drain(..self.buf.len() - trimmed);
                    }
                    None if end => self.buf.clear(),
                    None => return false,
                }
                self.in_call = false;
                self.hermes = Hermes::Head;
                true
            }
            Hermes::Whole => true,
        }
    }

    /// Where a call starts in `buf` (position, length of the opener), and how many
    /// trailing bytes to hold back because they might begin one.
    fn find_open(&self) -> (Option<(usize, usize)>, usize) {
        let b = &self.buf;
        match self.format {
            ToolFormat::Hermes => match b.find(HERMES_OPEN) {
                Some(at) => (Some((at, HERMES_OPEN.len())), 0),
                None => (None, partial_suffix(b, HERMES_OPEN)),
            },
            ToolFormat::Mistral => match b.find(MISTRAL_OPEN) {
                Some(at) => (Some((at, MISTRAL_OPEN.len())), 0),
                None => (None, partial_suffix(b, MISTRAL_OPEN)),
            },
            ToolFormat::Llama3 => {
                if !self.at_start {
                    return (None, 0);
                }
                let lead = b.len() - b.trim_start().len();
                let rest = &b[lead..];
                if rest.starts_with('{') {
                    (Some((lead, 0)), 0)
                } else if rest.starts_with(PYTHON_TAG) {
                    (Some((lead, PYTHON_TAG.len())), 0)
                } else if rest.is_empty() || PYTHON_TAG.starts_with(rest) {
                    (None, b.len())
                } else {
                    (None, 0)
                }
            }
        }
    }

    /// The text of a block that did not parse, with its opener put back.
    fn opener_for(&self, body: &str) -> String {
        match self.format {
            ToolFormat::Hermes => format!("{HERMES_OPEN}{body}"),
            ToolFormat::Mistral => format!("{MISTRAL_OPEN}{body}"),
            ToolFormat::Llama3 => body.to_owned(),
        }
    }

    fn parse_calls(&self, body: &str) -> Option<Vec<ToolCall>> {
        let body = body.trim();
        match self.format {
            ToolFormat::Hermes => Some(vec![call_from(&serde_json::from_str(body).ok()?)?]),
            ToolFormat::Mistral => {
                let v: Value = serde_json::from_str(body).ok()?;
                match v {
                    Value::Array(items) if !items.is_empty() => {
                        items.iter().map(call_from).collect::<Option<Vec<_>>>()
                    }
                    obj @ Value::Object(_) => Some(vec![call_from(&obj)?]),
                    _ => None,
                }
            }
            ToolFormat::Llama3 => {
                // One call, or several separated by `;`.
                let mut calls = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let mut de = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                    calls.push(call_from(&de.next()?.ok()?)?);
                    rest = rest[de.byte_offset()..].trim_start();
                    if let Some(r) = rest.strip_prefix(';') {
                        rest = r.trim_start();
                    } else if !rest.is_empty() {
                        return None;
                    }
                }
                (!calls.is_empty()).then_some(calls)
            }
        }
    }
}

fn call_from(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let args = v.get("arguments").or_else(|| v.get("parameters"))?;
    let args = match args {
        // Some models write the arguments as a JSON string.
        Value::String(s) => serde_json::from_str::<Value>(s).ok()?,
        other => other.clone(),
    };
    if !args.is_object() {
        return None;
    }
    Some(ToolCall {
        name,
        arguments: args.to_string(),
    })
}

fn push_text(out: &mut Vec<ToolPiece>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(ToolPiece::Text(t)) = out.last_mut() {
        t.push_str(&text);
    } else {
        out.push(ToolPiece::Text(text));
    }
}

fn trim_end_newlines(s: &str) -> &str {
    s.trim_end_matches(['\n', ' '])
}

/// Length of the longest suffix of `s` that is a proper prefix of `pat`.
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && pat.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// Fuzzing aid: feeds `pieces` to each format's parser and checks the contract: no
/// panic, and text that holds no call opener comes out exactly as it went in.
#[doc(hidden)]
pub fn check_parser_contract(pieces: &[String]) {
    let all: String = pieces.concat();
    for format in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
        let mut p = ToolParser::new(format);
        let mut out = Vec::new();
        for piece in pieces {
            out.extend(p.push(piece));
        }
        out.extend(p.finish());
        let opener = match format {
            ToolFormat::Hermes => all.contains(HERMES_OPEN),
            ToolFormat::Mistral => all.contains(MISTRAL_OPEN),
            ToolFormat::Llama3 => {
                let t = all.trim_start();
                t.starts_with('{') || t.starts_with(PYTHON_TAG)
            }
        };
        if !opener {
            let text: String = out
                .iter()
                .map(|p| match p {
                    ToolPiece::Text(t) => t.as_str(),
                    other => panic!("a call without an opener: {other:?}"),
                })
                .collect();
            assert_eq!(text, all, "{format:?} lost or changed text");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text and whole calls, streamed calls put back together.
    fn run(format: ToolFormat, pieces: &[&str]) -> Vec<ToolPiece> {
        let mut p = ToolParser::new(format);
        let mut all = Vec::new();
        for piece in pieces {
            all.extend(p.push(piece));
        }
        all.extend(p.finish());
        let mut out = Vec::new();
        for x in all {
            match (out.last_mut(), x) {
                (Some(ToolPiece::Text(a)), ToolPiece::Text(b)) => a.push_str(&b),
                (_, ToolPiece::Begin { name }) => out.push(call(&name, "")),
                (Some(ToolPiece::Call(c)), ToolPiece::Args(a)) => c.arguments.push_str(&a),
                (_, x) => out.push(x),
            }
        }
        out
    }

    fn call(name: &str, args: &str) -> ToolPiece {
        ToolPiece::Call(ToolCall {
            name: name.into(),
            arguments: args.into(),
        })
    }

    #[test]
    fn hermes_calls_are_found_across_pieces() {
        let out = run(
            ToolFormat::Hermes,
            &[
                "Let me check.\n<tool",
                "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_",
                "call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
            ],
        );
        assert_eq!(
            out,
            vec![
                ToolPiece::Text("Let me check.".into()),
                call("get_weather", r#"{"city": "Paris"}"#),
                call("now", "{}"),
            ]
        );
        // The usual layout streams: the name first, then the arguments as they come.
        let mut p = ToolParser::new(ToolFormat::Hermes);
        assert_eq!(p.push("<tool_call>\n{\"name\": \"f"), vec![]);
        assert_eq!(
            p.push("\", \"arguments\": {\"a\": \"}"),
            vec![
                ToolPiece::Begin { name: "f".into() },
                ToolPiece::Args("{\"a\": \"}".into())
            ]
        );
        assert_eq!(
            p.push("x\"}}\n</tool_call>"),
            vec![ToolPiece::Args("x\"}".into())]
        );
        assert_eq!(p.finish(), vec![]);
        // Multi-byte text where the layout is checked (found by fuzzing).
        let out = run(ToolFormat::Hermes, &["<tool_call>{\"ne22220è"]);
        assert_eq!(out, vec![ToolPiece::Text("<tool_call>{\"ne22220è".into())]);
        // Another layout is read whole.
        let out = run(
            ToolFormat::Hermes,
            &["<tool_call>\n{\"arguments\": {\"b\": 2}, \"name\": \"g\"}\n</tool_call>"],
        );
        assert_eq!(out, vec![call("g", r#"{"b":2}"#)]);
        // A partial opener is held back, then released when it is not one.
        let mut p = ToolParser::new(ToolFormat::Hermes);
        assert_eq!(p.push("a <tool"), vec![ToolPiece::Text("a".into())]);
        assert_eq!(p.push("box>"), vec![ToolPiece::Text(" <toolbox>".into())]);
        // A block that does not parse stays text.
        let out = run(ToolFormat::Hermes, &["<tool_call>\nnot json\n</tool_call>"]);
        assert_eq!(out, vec![ToolPiece::Text("<tool_call>\nnot json\n".into())]);
        // An unterminated block at the end is tried anyway.
        let out = run(
            ToolFormat::Hermes,
            &["<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}"],
        );
        assert_eq!(out, vec![call("f", r#"{"x":1}"#)]);
    }

    #[test]
    fn llama3_and_mistral_calls_parse() {
        let out = run(
            ToolFormat::Llama3,
            &["{\"name\": \"f\", ", "\"parameters\": {\"a\": [1, 2]}}"],
        );
        assert_eq!(out, vec![call("f", r#"{"a":[1,2]}"#)]);
        let out = run(
            ToolFormat::Llama3,
            &["<|python_tag|>{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {}}"],
        );
        assert_eq!(out, vec![call("f", "{}"), call("g", "{}")]);
        let out = run(ToolFormat::Llama3, &["Hello {there}"]);
        assert_eq!(out, vec![ToolPiece::Text("Hello {there}".into())]);
        let out = run(
            ToolFormat::Mistral,
            &["[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"q\": \"x\"}}, {\"name\": \"g\", \"arguments\": {}}]"],
        );
        assert_eq!(out, vec![call("f", r#"{"q":"x"}"#), call("g", "{}")]);
    }

    #[test]
    fn formats_are_detected_from_templates() {
        assert_eq!(
            ToolFormat::detect("{{ '<tool_call>' }}"),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::detect("[TOOL_CALLS] {{ tools }}"),
            ToolFormat::Mistral
        );
        assert_eq!(
            ToolFormat::detect("<|start_header_id|>{% if tools %}"),
            ToolFormat::Llama3
        );
        assert_eq!(ToolFormat::detect("<|im_start|>"), ToolFormat::Hermes);
    }

    #[test]
    fn grammars_name_only_the_chosen_function() {
        let tools = vec![
            ToolSpec {
                name: "a".into(),
                parameters: json!({"type": "object"}),
                strict: false,
            },
            ToolSpec {
                name: "b".into(),
                parameters: json!({"type": "object"}),
                strict: false,
            },
        ];
        let g = ToolFormat::Hermes
            .grammar(&tools, &ToolChoice::Function("b".into()), true, None)
            .unwrap();
        assert!(
            g.contains(r#""const":"b""#) && !g.contains(r#""const":"a""#),
            "{g}"
        );
        assert!(ToolFormat::Hermes
            .grammar(&tools, &ToolChoice::None, true, None)
            .is_none());
        let s = strict_schema(&json!({
            "type": "object",
            "properties": {"a": {"type": "array", "items": {"properties": {"b": {}}}}},
            "$defs": {"d": {"properties": {}, "additionalProperties": true}}
        }));
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["items"]["additionalProperties"], false);
        assert_eq!(s["$defs"]["d"]["additionalProperties"], true);
        assert_eq!(
            strict_schema(&json!({"type": "object"})),
            json!({"type": "object"})
        );
        let g = ToolFormat::Hermes
            .grammar(&tools, &ToolChoice::Auto, true, None)
            .unwrap();
        assert!(g.contains("start: TEXT | first"), "{g}");
    }
}
