//! Structured output and tool calling end to end: `hearth serve` with the default model,
//! real HTTP. Fifty varied JSON schemas all yield output that validates (checked with the
//! `jsonschema` crate, an implementation independent of llguidance); tool calls come
//! back whole and streamed in OpenAI's shapes; tool results render for the next turn;
//! bad schemas and tool settings are 400s naming the parameter.

mod common;

use common::{chat, Server};
use serde_json::{json, Value};

/// Fifty schemas: a dozen written out, the rest combined from property kinds so that
/// nesting, arrays, enums, bounds, formats, patterns and optional fields all appear.
fn schemas() -> Vec<Value> {
    let mut out = vec![
        json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"]}),
        json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
        json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 5}),
        json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "shade": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["color", "shade"]}),
        json!({"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string", "format": "email"}}, "required": ["id", "email"]}}, "required": ["user"]}),
        json!({"type": "object", "properties": {"date": {"type": "string", "format": "date"}, "time": {"type": "string", "format": "time"}}, "required": ["date", "time"]}),
        json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}, "required": ["code"]}),
        json!({"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}}, "required": ["value"]}),
        json!({"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 40}}, "required": ["note"]}),
        json!({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}, "required": ["a", "b"]}),
        json!({"type": "object", "properties": {"kind": {"const": "event"}, "priority": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["kind", "priority"]}),
        json!({"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}, "required": ["matrix"]}),
    ];
    let kinds: Vec<(&str, Value)> = vec![
        ("title", json!({"type": "string", "maxLength": 40})),
        (
            "count",
            json!({"type": "integer", "minimum": 0, "maximum": 1000}),
        ),
        (
            "price",
            json!({"type": "number", "minimum": 0, "maximum": 10000}),
        ),
        ("active", json!({"type": "boolean"})),
        ("status", json!({"enum": ["open", "closed", "pending"]})),
        (
            "tags",
            json!({"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 4}),
        ),
        (
            "scores",
            json!({"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4}),
        ),
        (
            "address",
            json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}),
        ),
        (
            "owner",
            json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "admin": {"type": "boolean"}}, "required": ["name"]}),
        ),
        ("id", json!({"type": "string", "format": "uuid"})),
        (
            "ratio",
            json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        ),
        ("level", json!({"type": "integer", "enum": [1, 2, 3, 5, 8]})),
        (
            "items",
            json!({"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}, "maxItems": 3}),
        ),
        ("when", json!({"type": "string", "format": "date-time"})),
    ];
    let mut i = 0usize;
    while out.len() < 50 {
        let n = 2 + i % 4;
        let mut props = serde_json::Map::new();
        let mut required = Vec::new();
        for j in 0..n {
            let (name, schema) = &kinds[(i * 5 + j * 3) % kinds.len()];
            if props.contains_key(*name) {
                continue;
            }
            props.insert((*name).into(), schema.clone());
            // Every other property optional, shifting with the schema.
            if (i + j).is_multiple_of(2) {
                required.push(Value::from(*name));
            }
        }
        out.push(json!({"type": "object", "properties": props, "required": required}));
        i += 1;
    }
    out
}

fn schema_request(i: usize, schema: &Value) -> Value {
    let mut body = chat(
        &format!("Produce example data number {i} as JSON for this schema: {schema}"),
        400,
    );
    body["temperature"] = json!(0.8);
    body["seed"] = json!(i);
    body["response_format"] = json!({
        "type": "json_schema",
        "json_schema": {"name": format!("schema_{i}"), "schema": schema, "strict": true}
    });
    body
}

#[test]
fn fifty_schemas_all_validate() {
    let s = Server::start(&[]);
    let schemas = schemas();
    assert_eq!(schemas.len(), 50);
    let results: Vec<(usize, u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = schemas
            .iter()
            .enumerate()
            .map(|(i, schema)| {
                let s = &s;
                scope.spawn(move || {
                    let (status, v) = s.post("/v1/chat/completions", &schema_request(i, schema));
                    (i, status, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for (i, status, v) in results {
        assert_eq!(status, 200, "schema {i}: {v}");
        let choice = &v["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap();
        if choice["finish_reason"] != "stop" {
            failures.push(format!(
                "schema {i}: finished {}: {text}",
                choice["finish_reason"]
            ));
            continue;
        }
        let doc: Value = match serde_json::from_str(text) {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("schema {i}: not JSON ({e}): {text}"));
                continue;
            }
        };
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schemas[i])
            .unwrap();
        let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            failures.push(format!("schema {i}: {text}: {errors:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            }, "required": ["city", "unit"]}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Current time in a time zone",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}}, "required": ["zone"]}
        }}
    ])
}

fn tool_request(tool_choice: Value) -> Value {
    let mut body = chat("What is the weather in Paris and in Rome?", 200);
    body["tools"] = weather_tools();
    body["tool_choice"] = tool_choice;
    body
}

fn check_call(call: &Value, name: &str) -> Value {
    assert_eq!(call["type"], "function");
    let id = call["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    assert_eq!(call["function"]["name"], name);
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object());
    args
}

#[test]
fn tool_calls_whole_streamed_and_round_trip() {
    let s = Server::start(&[]);
    // required: calls only, each argument object valid for get_weather or get_time.
    let (status, v) = s.post("/v1/chat/completions", &tool_request(json!("required")));
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    for c in calls {
        let name = c["function"]["name"].as_str().unwrap();
        let args = check_call(c, name);
        if name == "get_weather" {
            assert!(args["city"].is_string(), "{args}");
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
        } else {
            assert!(args["zone"].is_string(), "{args}");
        }
    }

    // A named function, one call, no parallel calls.
    let mut body = tool_request(json!({"type": "function", "function": {"name": "get_time"}}));
    body["parallel_tool_calls"] = json!(false);
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    check_call(&calls[0], "get_time");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    // Streamed: the same calls as the whole answer, as OpenAI deltas.
    let mut body = tool_request(json!("required"));
    body["stream"] = json!(true);
    let whole = s
        .post("/v1/chat/completions", &tool_request(json!("required")))
        .1;
    let events = s.stream("/v1/chat/completions", &body);
    let mut names: Vec<String> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        let ch = &c["choices"][0];
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
        for d in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let k = d["index"].as_u64().unwrap() as usize;
            if let Some(id) = d["id"].as_str() {
                assert_eq!(k, names.len(), "calls are numbered in order");
                assert!(id.starts_with("call_"));
                assert_eq!(d["type"], "function");
                names.push(d["function"]["name"].as_str().unwrap().into());
                args.push(String::new());
            }
            args[k].push_str(d["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let want: Vec<(String, String)> = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["function"]["name"].as_str().unwrap().into(),
                c["function"]["arguments"].as_str().unwrap().into(),
            )
        })
        .collect();
    let got: Vec<(String, String)> = names.into_iter().zip(args).collect();
    assert_eq!(got, want, "greedy: streamed calls equal the whole answer");

    // The results go back as tool messages and the conversation goes on.
    let call = &whole["choices"][0]["message"]["tool_calls"][0];
    let mut body = chat("What is the weather in Paris?", 40);
    body["tools"] = weather_tools();
    body["messages"] = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}
    ]);
    body["tool_choice"] = json!("none");
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 150, "{v}");
}

#[test]
fn grammars_regexes_limits_and_bad_settings() {
    let s = Server::start(&[]);
    // A regex on the completions endpoint.
    let body = json!({"prompt": "My phone number is", "max_tokens": 30, "temperature": 0,
                      "regex": " [0-9]{3}-[0-9]{4}"});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text.len(), 9, "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // A Lark grammar and guided_choice on chat.
    let mut body = chat("Is fire hot?", 20);
    body["grammar"] = json!("start: (\"Yes\" | \"No\") \", \" WORD \".\"\nWORD: /[a-z]{1,12}/");
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with("Yes, ") || text.starts_with("No, "),
        "{text}"
    );
    let mut body = chat("Pick a colour.", 20);
    body["guided_choice"] = json!(["red", "green"]);
    let (_, v) = s.post("/v1/chat/completions", &body);
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "red" || text == "green", "{text}");
    // json_object, streamed: the chunks join into one JSON object.
    let mut body = chat(
        "Write a JSON object with the name and age of Alice, who is 30.",
        200,
    );
    body["response_format"] = json!({"type": "json_object"});
    body["stream"] = json!(true);
    let mut text = String::new();
    for e in s
        .stream("/v1/chat/completions", &body)
        .iter()
        .rev()
        .skip(1)
        .rev()
    {
        let c: Value = serde_json::from_str(e).unwrap();
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(
        serde_json::from_str::<Value>(&text).unwrap().is_object(),
        "{text}"
    );
    // A schema that cannot be finished in max_tokens ends with length, not "stop".
    let schema = json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 40}}, "required": ["xs"]});
    let mut body = schema_request(0, &schema);
    body["max_tokens"] = json!(10);
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 10);

    // Bad settings: 400 naming the parameter and the problem.
    let with = |extra: Value| {
        let mut body = chat("Hi", 5);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (body, param, needle) in [
        (
            with(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}}}}),
            ),
            "response_format",
            "uniqueItems",
        ),
        (
            with(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wrong"}}}}),
            ),
            "response_format",
            "wrong",
        ),
        (
            with(json!({"response_format": {"type": "yaml"}})),
            "response_format.type",
            "yaml",
        ),
        (
            with(json!({"grammar": "start: nowhere"})),
            "grammar",
            "nowhere",
        ),
        (with(json!({"regex": "(a"})), "regex", ""),
        (
            with(
                json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "launch"}}}),
            ),
            "tool_choice",
            "launch",
        ),
        (
            with(json!({"tools": weather_tools(), "response_format": {"type": "json_object"}})),
            "response_format",
            "tool",
        ),
        (
            with(
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}], "tool_choice": "required"}),
            ),
            "tools",
            "",
        ),
        (
            with(json!({"messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].tool_call_id",
            "tool_call_id",
        ),
    ] {
        let (status, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{body}: {v}");
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], param, "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
    }
}
