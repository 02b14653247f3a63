//! Constrained decoding on the real model, through the scheduler: outputs match their
//! grammar (a JSON schema, a regex, a Lark grammar) whether they run alone or batched
//! with unconstrained sequences; bad grammars are refused up front; a grammar that
//! cannot finish within `max_tokens` ends with `Length`.

mod common;

use common::{collect, pool};

use std::sync::Arc;

use hearth_engine::scheduler::{spawn, Event, Request, SchedulerConfig};
use hearth_engine::{FinishReason, Grammar, LoadedModel, SamplingParams};
use serde_json::{json, Value};

fn chat_prompt(model: &LoadedModel, user: &str) -> Vec<u32> {
    let info = &model.info;
    let text = info
        .chat_template
        .render(&[hearth_models::ChatMessage::new("user", user)], true)
        .unwrap();
    info.tokenizer.encode(&text, false).unwrap()
}

fn request(model: &LoadedModel, user: &str, grammar: Option<&Grammar>, max: usize) -> Request {
    Request {
        owner: "test".into(),
        prompt: chat_prompt(model, user),
        params: SamplingParams {
            temperature: 0.7,
            seed: 11,
            ..SamplingParams::default()
        },
        max_tokens: max,
        logprobs: None,
        ignore_eos: false,
        constraint: grammar.map(|g| model.constraint(g).unwrap()),
    }
}

fn finished(end: &Event) -> FinishReason {
    match end {
        Event::Finished { reason, .. } => *reason,
        other => panic!("{other:?}"),
    }
}

#[test]
fn outputs_match_their_grammars_among_unconstrained_sequences() {
    let model = Arc::new(common::default_model());
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    let grammars = [
        Grammar::JsonSchema(schema),
        Grammar::JsonObject,
        Grammar::Regex(r"(yes|no), because [a-z ]{1,40}\.".into()),
        Grammar::Lark(
            r#"start: "The answer is " NUM "."
NUM: /[0-9]{1,4}/"#
                .into(),
        ),
    ];
    let (handle, _thread) = spawn(model.clone(), SchedulerConfig::default(), pool()).unwrap();
    let mut receivers = Vec::new();
    let asks = [
        "Describe a person as JSON.",
        "Write a JSON object with the name and age of Alice, who is 30.",
        "Is the sky blue?",
        "What is 12 times 12?",
    ];
    for (i, (g, ask)) in grammars.iter().zip(asks).enumerate() {
        let r = request(&model, ask, Some(g), 200);
        receivers.push((Some(i), handle.submit(r).unwrap()));
        // An unconstrained neighbour in the same batch.
        let r = request(&model, "Tell me a story.", None, 30);
        receivers.push((None, handle.submit(r).unwrap()));
    }
    let tok = &model.info.tokenizer;
    for (g, rx) in receivers {
        let (tokens, end) = collect(rx);
        let text = tok.decode(&tokens, true);
        let Some(g) = g else {
            assert!(matches!(end, Event::Finished { .. }), "{end:?}");
            continue;
        };
        assert_eq!(finished(&end), FinishReason::Stop, "grammar {g}: {text:?}");
        match g {
            0 => {
                let v: Value = serde_json::from_str(&text).expect(&text);
                assert!(v["name"].is_string() && v["name"].as_str().unwrap().chars().count() <= 20);
                let age = v["age"].as_i64().expect(&text);
                assert!((0..=120).contains(&age), "{text}");
                let tags = v["tags"].as_array().expect(&text);
                assert!(
                    tags.len() <= 3
                        && tags
                            .iter()
                            .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap()))
                );
                assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
            }
            1 => {
                let v: Value = serde_json::from_str(&text).expect(&text);
                assert!(v.is_object(), "{text}");
            }
            2 => {
                let (head, rest) = text.split_once(", because ").expect(&text);
                assert!(head == "yes" || head == "no", "{text}");
                assert!(rest.ends_with('.'), "{text}");
            }
            _ => {
                let n = text
                    .strip_prefix("The answer is ")
                    .and_then(|t| t.strip_suffix('.'))
                    .expect(&text);
                assert!(
                    n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn bad_grammars_are_refused_with_a_reason() {
    let model = common::default_model();
    for (g, needle) in [
        (Grammar::JsonSchema(json!({"type": "foo"})), "foo"),
        (
            Grammar::JsonSchema(json!({"type": "array", "uniqueItems": true})),
            "uniqueItems",
        ),
        (Grammar::Lark("start: foo".into()), "foo"),
        (Grammar::Regex("(unclosed".into()), ""),
    ] {
        let e = model.constraint(&g).unwrap_err();
        assert!(e.0.contains(needle), "{g:?}: {e}");
        assert!(!e.0.is_empty());
    }
}

#[test]
fn a_grammar_that_cannot_finish_in_time_ends_with_length() {
    let model = Arc::new(common::default_model());
    let schema = json!({
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "integer"}, "minItems": 50}},
        "required": ["items"]
    });
    let (handle, _thread) = spawn(model.clone(), SchedulerConfig::default(), pool()).unwrap();
    let g = Grammar::JsonSchema(schema);
    let rx = handle
        .submit(request(&model, "Numbers please.", Some(&g), 8))
        .unwrap();
    let (tokens, end) = collect(rx);
    assert_eq!(tokens.len(), 8);
    assert_eq!(finished(&end), FinishReason::Length);
    let text = model.info.tokenizer.decode(&tokens, true);
    assert!(text.starts_with("{\"items\": ["), "{text}");
}

/// Each tool-call format's grammar accepts what its parser reads back, and refuses
/// what the choice forbids.
#[test]
fn tool_call_grammars_agree_with_their_parsers() {
    use hearth_models::{ToolChoice, ToolFormat, ToolParser, ToolSpec};
    let model = common::default_model();
    let tok = &model.info.tokenizer;
    let tools = vec![
        ToolSpec {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            strict: true,
        },
        ToolSpec {
            name: "now".into(),
            parameters: json!({"type": "object", "properties": {}}),
            strict: true,
        },
    ];
    let weather = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
    let now = r#"{"name": "now", "arguments": {}}"#;
    let cases: Vec<(ToolFormat, ToolChoice, String, bool)> = vec![
        (
            ToolFormat::Hermes,
            ToolChoice::Auto,
            "Just text.".into(),
            true,
        ),
        (
            ToolFormat::Hermes,
            ToolChoice::Auto,
            format!("Let me look.\n<tool_call>\n{weather}\n</tool_call>"),
            true,
        ),
        (
            ToolFormat::Hermes,
            ToolChoice::Required,
            format!("<tool_call>\n{weather}\n</tool_call>\n<tool_call>\n{now}\n</tool_call>"),
            true,
        ),
        (
            ToolFormat::Hermes,
            ToolChoice::Required,
            "Just text.".into(),
            false,
        ),
        (
            ToolFormat::Hermes,
            ToolChoice::Function("now".into()),
            format!("<tool_call>\n{weather}\n</tool_call>"),
            false,
        ),
        (
            ToolFormat::Llama3,
            ToolChoice::Required,
            r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#.into(),
            true,
        ),
        (ToolFormat::Llama3, ToolChoice::Auto, "Hello.".into(), true),
        (
            ToolFormat::Mistral,
            ToolChoice::Required,
            format!("[TOOL_CALLS][{weather}, {now}]"),
            true,
        ),
    ];
    for (format, choice, text, ok) in cases {
        let lark = format.grammar(&tools, &choice, true, None).unwrap();
        let mut c = model
            .constraint(&Grammar::Lark(lark.clone()))
            .unwrap_or_else(|e| panic!("{format:?} {choice:?}: {e}\n{lark}"));
        let ids = tok.encode(&text, false).unwrap();
        let accepted = ids
            .iter()
            .all(|&t| c.mask().unwrap().allows(t) && c.commit(t).is_ok())
            && (c.is_finished() || c.is_accepting());
        assert_eq!(accepted, ok, "{format:?} {choice:?}: {text}");
        if ok {
            let mut p = ToolParser::new(format);
            let mut pieces = p.push(&text);
            pieces.extend(p.finish());
            let (_, calls) = hearth_models::tools::collect_pieces(pieces);
            assert_eq!(
                calls.len(),
                text.matches("\"name\"").count(),
                "{text}: {calls:?}"
            );
            for c in calls {
                let args: Value = serde_json::from_str(&c.arguments).unwrap();
                assert!(args.is_object(), "{text}: {c:?}");
            }
        }
    }
}

/// Text the grammar fixes is not sampled token by token: it goes through the model as
/// one chunk. With log-probabilities asked for, every token is sampled.
#[test]
fn forced_tokens_skip_sampling() {
    let model = Arc::new(common::default_model());
    let (handle, _thread) = spawn(model.clone(), SchedulerConfig::default(), pool()).unwrap();
    let g = Grammar::Lark(
        r#"start: "The quick brown fox jumps over the lazy dog, and then " NUM " more times."
NUM: /[1-9]/"#
            .into(),
    );
    let prefix = "The quick brown fox jumps over the lazy dog, and then ";
    let steps = || {
        handle
            .stats()
            .steps
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut runs = Vec::new();
    for logprobs in [None, Some(0)] {
        let mut r = request(&model, "Count.", Some(&g), 100);
        r.logprobs = logprobs;
        let before = steps();
        let (tokens, end) = collect(handle.submit(r).unwrap());
        assert_eq!(finished(&end), FinishReason::Stop);
        let text = model.info.tokenizer.decode(&tokens, true);
        let digit = text
            .strip_prefix(prefix)
            .and_then(|t| t.strip_suffix(" more times."));
        assert!(digit.is_some_and(|d| d.len() == 1), "{text}");
        runs.push((steps() - before, tokens.len()));
    }
    let (forced_steps, n) = runs[0];
    assert!(forced_steps <= 6, "{forced_steps} steps for {n} tokens");
    let (sampled_steps, m) = runs[1];
    assert!(
        sampled_steps as usize >= m,
        "{sampled_steps} steps for {m} tokens"
    );
}
