//! The OpenAI endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, each
//! answered whole or streamed as server-sent events.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures_util::future::try_join_all;
use hearth_engine::scheduler::{Event, Request, SubmitError};
use hearth_engine::{CompileError, Constraint, FinishReason, Grammar, GrammarLimits, LoadedModel};
use hearth_models::{PromptGuard, ToolCall, ToolFormat, ToolParser, ToolPiece};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::choice::{ChoiceText, Release, TokenInfo};
use crate::error::{ApiError, JsonObject};
use crate::request::{ChatFields, CommonFields, CompletionFields, Generation, PromptInput};
use crate::structured;
use crate::{AppState, Engine, RequestCtx};

/// Tokens a text completion produces when the client sets no limit (OpenAI's default).
const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// Choices one request may ask for, all prompts together.
const MAX_CHOICES: usize = 128;

/// The `finish_reason` of a streamed choice cut at the end of the shutdown grace period
/// (an error event follows it, then `[DONE]`): one that every OpenAI client knows, and
/// true in kind: the output stopped at a limit, not at its end.
const CUT_FINISH: &str = "length";

/// Said to requests cut at the end of the shutdown grace period.
const SHUTTING_DOWN: &str = "The server is shutting down.";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let r = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.finish()
    };
    format!("{prefix}-{:016x}{:016x}", r(1), r(2))
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.served_model,
        "object": "model",
        "created": state.created,
        "owned_by": "hearth",
    })
}

/// The request's context (set by the gate for every routed request).
type Ctx = Option<Extension<Arc<RequestCtx>>>;

/// Whether the request's key may use the served model (no key: yes).
fn allowed(state: &AppState, ctx: &Ctx) -> bool {
    ctx.as_ref()
        .and_then(|c| c.identity.as_ref())
        .is_none_or(|i| i.may_use(&state.served_model))
}

pub async fn list_models(State(state): State<Arc<AppState>>, ctx: Ctx) -> Json<Value> {
    let data: Vec<Value> = if allowed(&state, &ctx) {
        vec![model_object(&state)]
    } else {
        Vec::new()
    };
    Json(json!({ "object": "list", "data": data }))
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id != state.served_model || !allowed(&state, &ctx) {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(model_object(&state)))
}

/// The engine, or 503 while it loads or the server drains.
fn engine(state: &AppState) -> Result<&Engine, ApiError> {
    if state.draining.load(Relaxed) {
        return Err(ApiError::unavailable("The server is shutting down."));
    }
    if state.embedder.get().is_some() {
        return Err(ApiError::invalid(
            Some("model"),
            format!(
                "The model `{}` is an embedding model: it does not generate text. Use /v1/embeddings.",
                state.served_model
            ),
        ));
    }
    state
        .engine
        .get()
        .ok_or_else(|| ApiError::unavailable("The model is still loading."))
}

fn check_model(state: &AppState, common: &CommonFields) -> Result<(), ApiError> {
    match &common.model {
        Some(m) if *m != state.served_model => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// One prompt of a request and what its choices start with.
struct PromptJob {
    tokens: Vec<u32>,
    /// `echo`: the prompt text, sent before the completion.
    echo: Option<String>,
}

/// What both generation endpoints do first: the common fields, the model check, the
/// engine (or 503).
fn begin<'s>(
    state: &'s AppState,
    body: &Value,
    endpoint: &str,
) -> Result<(CommonFields, &'s Engine), ApiError> {
    let common = CommonFields::parse(body)?;
    check_model(state, &common)?;
    tracing::debug!(user = common.user.as_deref(), endpoint, "request");
    Ok((common, engine(state)?))
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let origin = Origin::new(ctx, &body, "messages");
    let (common, engine) = begin(&state, &body, "chat/completions")?;
    let chat = ChatFields::parse(&body)?;
    let info = &engine.model.info;
    let gen = common.generation(chat.logprobs()?, info.config.vocab_size)?;
    let messages = chat.messages()?;
    let spec = structured::output_spec(&body)?;
    let tools = structured::tools(&body)?;
    let active = tools.as_ref().filter(|t| t.active()).cloned();
    if active.is_some() && spec.grammar.is_some() {
        return Err(ApiError::invalid(
            Some(spec.param),
            format!(
                "'{}' cannot be combined with tool calls; use tool_choice 'none' or leave it out.",
                spec.param
            ),
        ));
    }
    let tool_format = active.as_ref().map(|_| info.chat_template.tool_format);
    let (grammar, param) = match &active {
        Some(t) => {
            let tok = &info.tokenizer;
            let mistral = tok
                .token_id("[TOOL_CALLS]")
                .filter(|&id| tok.is_control(id))
                .map(|id| format!("<[{id}]>"));
            let grammar = t.grammar(info.chat_template.tool_format, mistral.as_deref());
            (grammar, "tools")
        }
        None => (spec.grammar.clone(), spec.param),
    };
    let constraint = compile(
        &engine.model,
        grammar.as_ref(),
        param,
        &state.limits.grammar,
    )
    .await?;
    let model = engine.model.clone();
    // Template and tokenizer work is CPU work: off the async threads.
    let prompts = blocking(move || {
        let info = &model.info;
        // Client text is tokenized as text: only the template's markup becomes control
        // tokens.
        let mut guard = PromptGuard::new(&info.tokenizer);
        let hidden = |e: hearth_models::GuardError| {
            ApiError::invalid(
                Some("messages"),
                format!("Cannot tokenize the messages: {e}"),
            )
        };
        let messages = guard.hide_messages(&messages).map_err(hidden)?;
        let raw = tools
            .as_ref()
            .map_or(Ok(Vec::new()), |t| {
                t.raw.iter().map(|v| guard.hide_value(v)).collect()
            })
            .map_err(hidden)?;
        let text = info
            .chat_template
            .render_with_tools(&messages, &raw, true)
            .map_err(|e| {
                ApiError::invalid(
                    Some("messages"),
                    format!("The chat template rejected the messages: {e}"),
                )
            })?;
        let tokens = guard.encode(&text, false).map_err(|e| {
            ApiError::invalid(
                Some("messages"),
                format!("Cannot tokenize the messages: {e}"),
            )
        })?;
        Ok(vec![PromptJob { tokens, echo: None }])
    })
    .await?;
    let out = Output {
        grammar_param: constraint.as_ref().map(|_| param),
        constraint,
        tool_format,
    };
    run(state.clone(), Kind::Chat, gen, prompts, out, origin).await
}

/// Where a request came from: when, its gate context, and (for the audit log with
/// `--audit-content`) its prompt as sent.
struct Origin {
    received: Instant,
    ctx: Option<Arc<RequestCtx>>,
    prompt: Option<Value>,
}

impl Origin {
    fn new(ctx: Ctx, body: &Value, prompt_field: &str) -> Self {
        let ctx = ctx.map(|Extension(c)| c);
        if let Some(c) = &ctx {
            c.requested(body);
        }
        let prompt = ctx
            .as_ref()
            .filter(|c| c.wants_content())
            .map(|_| body.get(prompt_field).cloned().unwrap_or(Value::Null));
        Self {
            received: Instant::now(),
            ctx,
            prompt,
        }
    }
}

/// What shapes a request's output: the compiled grammar, and the tool-call format to
/// read calls back in.
struct Output {
    constraint: Option<Constraint>,
    tool_format: Option<ToolFormat>,
    /// The parameter the grammar came from, for errors.
    grammar_param: Option<&'static str>,
}

/// Compiles a client's grammar for the model within the server's grammar limits; a bad
/// one, or one over a limit, is the client's 400 naming the parameter.
async fn compile(
    model: &LoadedModel,
    grammar: Option<&Grammar>,
    param: &str,
    limits: &GrammarLimits,
) -> Result<Option<Constraint>, ApiError> {
    let Some(g) = grammar else {
        return Ok(None);
    };
    model
        .constraint_bounded(g, limits)
        .await
        .map(Some)
        .map_err(|e| {
            let hint = match e {
                CompileError::TooLarge { .. } => " (--max-grammar-kb)",
                CompileError::TooDeep { .. } => " (--max-grammar-depth)",
                CompileError::Timeout(_) => " (--grammar-timeout)",
                CompileError::Invalid(_) | CompileError::Internal => "",
            };
            ApiError::invalid(Some(param), format!("Invalid '{param}': {e}{hint}."))
        })
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let origin = Origin::new(ctx, &body, "prompt");
    let (common, engine) = begin(&state, &body, "completions")?;
    let fields = CompletionFields::parse(&body)?;
    let info = &engine.model.info;
    let gen = common.generation(fields.logprobs()?, info.config.vocab_size)?;
    if let Some(b) = fields.best_of {
        if b != gen.params.len() as i64 && b != 1 {
            return Err(ApiError::invalid(
                Some("best_of"),
                "'best_of' other than 'n' is not supported.",
            ));
        }
    }
    let echo = fields.echo.unwrap_or(false);
    let inputs = fields.prompts()?;
    let spec = structured::output_spec(&body)?;
    let constraint = compile(
        &engine.model,
        spec.grammar.as_ref(),
        spec.param,
        &state.limits.grammar,
    )
    .await?;
    let model = engine.model.clone();
    let plain = !state.limits.completions_special_tokens;
    let prompts = blocking(move || prompt_jobs(&model, inputs, echo, plain)).await?;
    let out = Output {
        grammar_param: constraint.as_ref().map(|_| spec.param),
        constraint,
        tool_format: None,
    };
    run(state.clone(), Kind::Completion, gen, prompts, out, origin).await
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!("a blocking task failed: {e}");
        ApiError::internal()
    })?
}

/// Completion prompts as token ids (and their text, for `echo`). With `plain`, text
/// that spells a control token is tokenized as text (`--no-completions-special-tokens`).
fn prompt_jobs(
    model: &LoadedModel,
    inputs: Vec<PromptInput>,
    echo: bool,
    plain: bool,
) -> Result<Vec<PromptJob>, ApiError> {
    let info = &model.info;
    let mut prompts = Vec::new();
    for p in inputs {
        let (tokens, text) = match p {
            PromptInput::Text(t) => {
                let bad = |e: String| {
                    ApiError::invalid(Some("prompt"), format!("Cannot tokenize the prompt: {e}"))
                };
                let ids = if plain {
                    let mut guard = PromptGuard::new(&info.tokenizer);
                    let hidden = guard.hide(&t).map_err(|e| bad(e.to_string()))?;
                    guard.encode(&hidden, true)
                } else {
                    info.tokenizer.encode(&t, true)
                }
                .map_err(|e| bad(e.to_string()))?;
                (ids, t)
            }
            PromptInput::Tokens(ids) => {
                let vocab = info.config.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::invalid(
                        Some("prompt"),
                        format!("Invalid 'prompt': token id {bad} is not below the vocabulary size {vocab}."),
                    ));
                }
                let text = info.tokenizer.decode(&ids, false);
                (ids, text)
            }
        };
        prompts.push(PromptJob {
            tokens,
            echo: echo.then_some(text),
        });
    }
    Ok(prompts)
}

/// What one choice came to.
struct ChoiceResult {
    text: String,
    /// Bytes of echoed prompt at the start of `text`.
    echo_len: usize,
    tokens: Vec<TokenInfo>,
    finish: &'static str,
    completion_tokens: usize,
}

/// Shared by every choice of one request.
struct Job {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    stop: Vec<String>,
    logprobs: bool,
    include_usage: bool,
    received: Instant,
    ctx: Option<Arc<RequestCtx>>,
    /// Tool calls are read out of the reply in this format.
    tool_format: Option<ToolFormat>,
    /// The parameter the output's grammar came from.
    grammar_param: Option<&'static str>,
}

async fn run(
    state: Arc<AppState>,
    kind: Kind,
    gen: Generation,
    prompts: Vec<PromptJob>,
    out: Output,
    origin: Origin,
) -> Result<Response, ApiError> {
    let engine = engine(&state)?;
    let bounds = &state.limits;
    let ctx = engine.scheduler.context_length();
    let max_param = gen.max_tokens_param;
    let prompt_param = if kind == Kind::Chat {
        "messages"
    } else {
        "prompt"
    };
    // Check every prompt before starting any.
    let mut limits = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let n = p.tokens.len();
        if n == 0 {
            return Err(ApiError::invalid(
                Some(prompt_param),
                "The prompt is empty.",
            ));
        }
        if let Some(most) = bounds.max_prompt_tokens.filter(|&m| n > m) {
            return Err(ApiError::context_length(
                format!("This server accepts prompts of at most {most} tokens. However, your {prompt_param} resulted in {n} tokens. Please reduce the length of the {prompt_param}."),
                prompt_param,
            ));
        }
        if n >= ctx {
            return Err(ApiError::context_length(
                format!("This model's maximum context length is {ctx} tokens. However, your {prompt_param} resulted in {n} tokens. Please reduce the length of the {prompt_param}."),
                prompt_param,
            ));
        }
        let max = match gen.max_tokens {
            Some(m) if bounds.max_tokens.is_some_and(|most| m > most) => {
                return Err(ApiError::invalid(
                    Some(max_param),
                    format!(
                        "Invalid '{max_param}': this server generates at most {} tokens per request; {m} were asked for.",
                        bounds.max_tokens.unwrap_or(0)
                    ),
                ));
            }
            Some(m) if n + m > ctx => {
                return Err(ApiError::context_length(
                    format!("This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({n} in the {prompt_param}, {m} in the completion). Please reduce the length of the {prompt_param} or completion.", n + m),
                    max_param,
                ));
            }
            Some(m) => m,
            None if kind == Kind::Completion => COMPLETION_DEFAULT_MAX_TOKENS.min(ctx - n),
            None => ctx - n,
        };
        let max = bounds.max_tokens.map_or(max, |most| max.min(most));
        limits.push(max);
    }
    let choices = prompts.len() * gen.params.len();
    if choices > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "This request asks for {choices} choices (prompts × n); at most {MAX_CHOICES}."
            ),
        ));
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.tokens.len()).sum();
    let n = gen.params.len();
    if let Some(c) = &origin.ctx {
        // The key's token budget holds the most this request can use until it ends. Without
        // max_tokens, the default is cut to what a minute of that budget allows.
        if let (None, Some(tpm)) = (gen.max_tokens, c.tokens_per_minute()) {
            let most = (tpm as usize).saturating_sub(prompt_tokens) / choices;
            limits.iter_mut().for_each(|m| *m = (*m).min(most.max(1)));
        }
        c.reserve(
            (prompt_tokens + limits.iter().sum::<usize>() * n) as u64,
            max_param,
        )?;
    }
    let owner = origin.ctx.as_ref().map_or_else(|| "".into(), |c| c.owner());
    let mut requests = Vec::with_capacity(choices);
    for (p, &max_tokens) in prompts.iter().zip(&limits) {
        for params in &gen.params {
            requests.push(Request {
                owner: owner.clone(),
                prompt: p.tokens.clone(),
                params: params.clone(),
                max_tokens,
                logprobs: gen.logprobs,
                ignore_eos: gen.ignore_eos,
                // Each choice follows the grammar on its own.
                constraint: out.constraint.clone(),
            });
        }
    }
    // All choices get queue places together, or the request is refused.
    let receivers = engine.scheduler.submit_all(requests).map_err(|e| match e {
        SubmitError::QueueFull(n) => ApiError::queue_full(n),
        SubmitError::OwnerFull { cap, asked, .. } if asked > cap => ApiError::invalid(
            Some("n"),
            format!("This request asks for {asked} sequences (prompts × n) but one key or client may have at most {cap} queued or running."),
        ),
        SubmitError::OwnerFull { cap, held, .. } => ApiError::rate_limited(
            format!("Too many sequences for this key or client: {held} queued or running of at most {cap}. Retry when some finish."),
            1,
        ),
        SubmitError::Stopped => ApiError::unavailable("The engine has stopped."),
        SubmitError::Invalid(msg) => ApiError::invalid(Some(prompt_param), msg),
    })?;
    let echoes: Vec<Option<String>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.echo.clone(), n))
        .collect();
    let job = Arc::new(Job {
        state: state.clone(),
        kind,
        id: random_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now_secs(),
        stop: gen.stop.clone(),
        logprobs: gen.logprobs.is_some(),
        include_usage: gen.include_usage,
        received: origin.received,
        ctx: origin.ctx.clone(),
        tool_format: out.tool_format,
        grammar_param: out.grammar_param,
    });
    if let Some(c) = &origin.ctx {
        c.begin(
            &state.served_model,
            gen.stream,
            choices,
            prompt_tokens,
            || origin.prompt.unwrap_or(Value::Null),
        );
    }
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Relaxed);
    if gen.stream {
        Ok(stream_response(job, receivers, echoes, prompt_tokens))
    } else {
        // Cut at the shutdown deadline: dropping the reply cancels its sequences.
        tokio::select! {
            r = whole_response(job, receivers, echoes, prompt_tokens) => r,
            () = state.past_deadline() => Err(ApiError::unavailable(SHUTTING_DOWN)),
        }
    }
}

/// Reads one choice's events to the end, handing each release to `emit` (which returns
/// false when nobody listens any more). Dropping the receiver on return cancels the
/// sequence if it is still running (a stop sequence was found, or the client left).
async fn drive_choice(
    job: &Job,
    index: usize,
    mut rx: UnboundedReceiver<Event>,
    mut emit: impl FnMut(Release) -> bool,
) -> Result<(&'static str, usize), ApiError> {
    let engine = engine_ref(&job.state);
    let tokenizer = &engine.model.info.tokenizer;
    let mut text = ChoiceText::new(job.stop.clone());
    if job.tool_format.is_some() {
        // Call openers that some tokenizers have as control tokens.
        let openers = ["[TOOL_CALLS]", "<|python_tag|>"]
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .collect();
        text.keep_control_tokens(openers);
    }
    let mut generated = 0;
    let mut last: Option<Instant> = None;
    let metrics = &job.state.metrics;
    loop {
        let Some(event) = rx.recv().await else {
            tracing::error!("the engine dropped a request without finishing it");
            return Err(ApiError::internal());
        };
        match event {
            Event::Token { id, logprobs } => {
                let now = Instant::now();
                match last {
                    None => metrics.ttft.observe(now - job.received),
                    Some(t) => metrics.itl.observe(now - t),
                }
                last = Some(now);
                generated += 1;
                let r = text.push(tokenizer, id, logprobs.as_ref());
                if let Some(c) = &job.ctx {
                    c.token(index, &r.text);
                }
                let stopped = r.stopped;
                if !emit(r) {
                    return Ok(("stop", generated));
                }
                if stopped {
                    return Ok(("stop", generated));
                }
            }
            Event::Finished { reason, .. } => {
                let r = text.finish();
                if let Some(c) = &job.ctx {
                    c.text(index, &r.text);
                }
                let stopped = r.stopped;
                emit(r);
                let finish = match reason {
                    _ if stopped => "stop",
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                };
                return Ok((finish, generated));
            }
            Event::Failed(msg) => {
                tracing::error!("generation failed: {msg}");
                return Err(ApiError::internal());
            }
            Event::GrammarFailed(msg) => {
                let param = job.grammar_param.unwrap_or("response_format");
                return Err(ApiError::invalid(
                    Some(param),
                    format!("Invalid '{param}': the grammar failed during generation: {msg}."),
                ));
            }
        }
    }
}

fn engine_ref(state: &AppState) -> &Engine {
    state
        .engine
        .get()
        .expect("requests run only once the engine is loaded")
}

fn finish_metrics(job: &Job, completion_tokens: usize) {
    let m = &job.state.metrics;
    m.completion_tokens
        .fetch_add(completion_tokens as u64, Relaxed);
    m.duration.observe(job.received.elapsed());
}

async fn whole_response(
    job: Arc<Job>,
    receivers: Vec<UnboundedReceiver<Event>>,
    echoes: Vec<Option<String>>,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let runs = receivers
        .into_iter()
        .zip(echoes)
        .enumerate()
        .map(|(index, (rx, echo))| {
            let job = job.clone();
            async move {
                let mut text = echo.unwrap_or_default();
                let echo_len = text.len();
                let mut tokens = Vec::new();
                let (finish, completion_tokens) = drive_choice(&job, index, rx, |r| {
                    text.push_str(&r.text);
                    tokens.extend(r.tokens);
                    true
                })
                .await?;
                Ok::<_, ApiError>(ChoiceResult {
                    text,
                    echo_len,
                    tokens,
                    finish,
                    completion_tokens,
                })
            }
        });
    // The first failure drops the other choices, which cancels them.
    let results: Vec<ChoiceResult> = try_join_all(runs).await?;
    let completion_tokens: usize = results.iter().map(|r| r.completion_tokens).sum();
    finish_metrics(&job, completion_tokens);
    let choices: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (choice, finish) = whole_choice(&job, i, r);
            if let Some(c) = &job.ctx {
                c.finish(i, finish);
            }
            choice
        })
        .collect();
    let object = match job.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    let state = &job.state;
    Ok(Json(json!({
        "id": job.id,
        "object": object,
        "created": job.created,
        "model": state.served_model,
        "system_fingerprint": crate::FINGERPRINT,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// One choice of a whole reply, and its finish reason.
fn whole_choice(job: &Job, i: usize, r: &ChoiceResult) -> (Value, &'static str) {
    match job.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": r.text, "refusal": null});
            let mut finish = r.finish;
            if let Some(format) = job.tool_format {
                let (content, calls) = split_tool_calls(format, &r.text);
                if !calls.is_empty() {
                    message["content"] = (!content.is_empty()).then_some(content).into();
                    message["tool_calls"] = calls.iter().map(tool_call_json).collect();
                    finish = tool_finish(finish);
                }
            }
            let choice = json!({
                "index": i,
                "message": message,
                "logprobs": job.logprobs.then(|| chat_logprobs(&r.tokens)),
                "finish_reason": finish,
            });
            (choice, finish)
        }
        Kind::Completion => {
            let choice = json!({
                "index": i,
                "text": r.text,
                "logprobs": job.logprobs.then(|| completion_logprobs(&r.tokens, r.echo_len)),
                "finish_reason": r.finish,
            });
            (choice, r.finish)
        }
    }
}

/// A whole reply read for tool calls: its text and its calls.
fn split_tool_calls(format: ToolFormat, text: &str) -> (String, Vec<ToolCall>) {
    let mut parser = ToolParser::new(format);
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish());
    hearth_models::tools::collect_pieces(pieces)
}

/// A reply that ended by itself with calls in it ends for `tool_calls`.
fn tool_finish(finish: &'static str) -> &'static str {
    if finish == "stop" {
        "tool_calls"
    } else {
        finish
    }
}

/// OpenAI's call ids: `call_` and 24 random characters.
fn call_id() -> String {
    let id = random_id("call");
    format!("call_{}", &id[5..29])
}

fn tool_call_json(c: &ToolCall) -> Value {
    json!({
        "id": call_id(),
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn token_json(t: &str, bytes: &[u8], logprob: f32) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("token".into(), t.into());
    m.insert("logprob".into(), logprob.into());
    m.insert(
        "bytes".into(),
        bytes.iter().map(|&b| Value::from(b)).collect(),
    );
    m
}

/// Chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}`.
fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = token_json(&t.text, &t.bytes, t.logprob);
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|(s, b, l)| Value::Object(token_json(s, b, *l)))
                .collect();
            m.insert("top_logprobs".into(), top.into());
            Value::Object(m)
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Completions shape: parallel arrays, `top_logprobs` as token → logprob maps, and each
/// token's offset in the choice's text (starting at `offset`).
fn completion_logprobs(tokens: &[TokenInfo], offset: usize) -> Value {
    let text_offset: Vec<usize> = tokens.iter().map(|t| offset + t.offset).collect();
    json!({
        "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| {
                let m: Map<String, Value> =
                    t.top.iter().map(|(s, _, l)| (s.clone(), Value::from(*l))).collect();
                Value::Object(m)
            })
            .collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// One `data:` line of the event stream.
fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl Job {
    /// A chunk with one choice in it.
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.state.served_model,
            "system_fingerprint": crate::FINGERPRINT,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// `offset`: bytes before the generated text in the choice (the echoed prompt).
    fn text_chunk(&self, index: usize, release: &Release, offset: usize) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(json!({
                "index": index,
                "delta": {"content": release.text},
                "logprobs": self.logprobs.then(|| chat_logprobs(&release.tokens)),
                "finish_reason": null,
            })),
            Kind::Completion => self.chunk(json!({
                "index": index,
                "text": release.text,
                "logprobs": self.logprobs.then(|| completion_logprobs(&release.tokens, offset)),
                "finish_reason": null,
            })),
        }
    }

    /// Sends a reply's pieces as chat chunks: text as `content`, each call as OpenAI
    /// streams one (its id and name with empty arguments, then the arguments).
    /// Returns false when nobody listens any more.
    fn send_pieces(
        &self,
        tx: &mpsc::UnboundedSender<Bytes>,
        index: usize,
        pieces: Vec<ToolPiece>,
        calls: &mut usize,
    ) -> bool {
        for p in pieces {
            let chunks = match p {
                ToolPiece::Text(text) => {
                    let r = Release {
                        text,
                        ..Release::default()
                    };
                    vec![self.text_chunk(index, &r, 0)]
                }
                ToolPiece::Call(c) => {
                    *calls += 1;
                    vec![
                        self.call_delta(index, *calls - 1, Some(&c.name), ""),
                        self.call_delta(index, *calls - 1, None, &c.arguments),
                    ]
                }
                ToolPiece::Begin { name } => {
                    *calls += 1;
                    vec![self.call_delta(index, *calls - 1, Some(&name), "")]
                }
                ToolPiece::Args(a) => {
                    vec![self.call_delta(index, calls.saturating_sub(1), None, &a)]
                }
            };
            for c in chunks {
                if tx.send(sse(&c)).is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// A `tool_calls` delta: the call's id, type and name when it begins (`name`),
    /// else a fragment of its arguments.
    fn call_delta(&self, index: usize, call: usize, name: Option<&str>, arguments: &str) -> Value {
        let call = match name {
            Some(name) => json!({
                "index": call,
                "id": call_id(),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }),
            None => json!({"index": call, "function": {"arguments": arguments}}),
        };
        self.chunk(json!({
            "index": index,
            "delta": {"tool_calls": [call]},
            "logprobs": null,
            "finish_reason": null,
        }))
    }

    fn finish_chunk(&self, index: usize, finish: &str) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(json!({
                "index": index, "delta": {}, "logprobs": null, "finish_reason": finish,
            })),
            Kind::Completion => self.chunk(json!({
                "index": index, "text": "", "logprobs": null, "finish_reason": finish,
            })),
        }
    }
}

/// How a streamed choice ended (its task returns `None` when the client left or the
/// choice failed).
enum Ended {
    /// At its end, with this many tokens generated.
    Finished(usize),
    /// At the shutdown deadline: its final chunk went out with [`CUT_FINISH`].
    Cut,
}

/// Streams every choice as it is generated. The response starts at once; a client that
/// goes away drops the body, which closes the channel, which ends each choice's task and
/// so cancels its sequence in the engine. A choice still running at the shutdown
/// deadline ends with a final chunk, and the stream with one error event and `[DONE]`.
fn stream_response(
    job: Arc<Job>,
    receivers: Vec<UnboundedReceiver<Event>>,
    echoes: Vec<Option<String>>,
    prompt_tokens: usize,
) -> Response {
    // Unbounded: a choice's chunks are bounded by its max_tokens.
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let mut tasks = Vec::new();
    for (index, (events, echo)) in receivers.into_iter().zip(echoes).enumerate() {
        let (job, tx) = (job.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            if job.kind == Kind::Chat {
                let first = job.chunk(json!({
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                }));
                tx.send(sse(&first)).ok()?;
            }
            let mut offset = 0;
            if let Some(echo) = echo {
                let r = Release {
                    text: echo,
                    ..Release::default()
                };
                offset = r.text.len();
                tx.send(sse(&job.text_chunk(index, &r, 0))).ok()?;
            }
            let mut tools = job.tool_format.map(ToolParser::new);
            let mut calls = 0;
            let drive = drive_choice(&job, index, events, |r| {
                if r.text.is_empty() && r.tokens.is_empty() {
                    return !tx.is_closed();
                }
                match &mut tools {
                    None => tx.send(sse(&job.text_chunk(index, &r, offset))).is_ok(),
                    Some(p) => job.send_pieces(&tx, index, p.push(&r.text), &mut calls),
                }
            });
            let result = tokio::select! {
                r = drive => r,
                _ = tx.closed() => return None,
                () = job.state.past_deadline() => {
                    tx.send(sse(&job.finish_chunk(index, CUT_FINISH))).ok()?;
                    return Some(Ended::Cut);
                }
            };
            match result {
                Ok((mut finish, completion_tokens)) => {
                    if let Some(p) = &mut tools {
                        if !job.send_pieces(&tx, index, p.finish(), &mut calls) {
                            return None;
                        }
                        if calls > 0 {
                            finish = tool_finish(finish);
                        }
                    }
                    if let Some(c) = &job.ctx {
                        c.finish(index, finish);
                    }
                    tx.send(sse(&job.finish_chunk(index, finish))).ok()?;
                    Some(Ended::Finished(completion_tokens))
                }
                Err(e) => {
                    let _ = tx.send(sse(&e.body()));
                    None
                }
            }
        }));
    }
    // After every choice: the usage chunk when asked for, then [DONE].
    tokio::spawn(async move {
        let mut completion_tokens = 0;
        let mut complete = true;
        let mut cut = false;
        for t in tasks {
            match t.await {
                Ok(Some(Ended::Finished(n))) => completion_tokens += n,
                Ok(Some(Ended::Cut)) => cut = true,
                _ => complete = false,
            }
        }
        finish_metrics(&job, completion_tokens);
        if !complete {
            return; // the client left or a choice failed (its error was sent)
        }
        if cut {
            let _ = tx.send(sse(&ApiError::unavailable(SHUTTING_DOWN).body()));
        } else if job.include_usage {
            let mut v = job.chunk(Value::Null);
            v["choices"] = json!([]);
            v["usage"] = usage(prompt_tokens, completion_tokens);
            let _ = tx.send(sse(&v));
        }
        // The request is over (its audit record and key charges go out) before the
        // client can see the end of the stream.
        drop(job);
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Texts one embeddings request may carry (OpenAI's limit).
const MAX_EMBEDDING_INPUTS: usize = 2048;

/// `POST /v1/embeddings`: `input` a string or a list of strings; `encoding_format`
/// `float` or `base64` (little-endian f32); `dimensions` only as the model's own. Texts
/// longer than the model's window are truncated (as sentence-transformers does); the
/// inputs of concurrent requests run through the encoder together.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    ctx: Ctx,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let origin = Origin::new(ctx, &body, "input");
    if let Some(m) = body.get("model").and_then(Value::as_str) {
        if m != state.served_model {
            return Err(ApiError::model_not_found(m));
        }
    }
    if state.draining.load(Relaxed) {
        return Err(ApiError::unavailable("The server is shutting down."));
    }
    let Some(handle) = state.embedder.get() else {
        return Err(match state.engine.get() {
            Some(_) => ApiError::invalid(
                Some("model"),
                format!(
                    "The model `{}` generates text; it does not produce embeddings. Serve an embedding model (e.g. all-MiniLM-L6-v2) for /v1/embeddings.",
                    state.served_model
                ),
            ),
            None => ApiError::unavailable("The model is still loading."),
        });
    };
    let bad = |m: String| ApiError::invalid(Some("input"), m);
    let texts: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().any(|i| i.is_number() || i.is_array()) {
                return Err(bad(
                    "Token-id inputs are not supported: this model has its own tokenizer. Send text (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False)).".into(),
                ));
            }
            items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("Invalid 'input': every item must be a string.".into()))
                })
                .collect::<Result<_, _>>()?
        }
        Some(Value::Array(_)) => return Err(bad("Invalid 'input': the list is empty.".into())),
        Some(_) => {
            return Err(bad(
                "Invalid 'input': expected a string or a list of strings.".into(),
            ))
        }
        None => return Err(bad("Missing required parameter: 'input'.".into())),
    };
    if texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad(format!(
            "Invalid 'input': {} texts; at most {MAX_EMBEDDING_INPUTS} per request.",
            texts.len()
        )));
    }
    if texts.iter().any(String::is_empty) {
        return Err(bad("Invalid 'input': texts must not be empty.".into()));
    }
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(v) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("Invalid 'encoding_format': {v}; expected 'float' or 'base64'."),
            ))
        }
    };
    let dim = handle.embedder.dim();
    match body.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(dim as u64) => {}
        Some(v) => {
            return Err(ApiError::invalid(
                Some("dimensions"),
                format!(
                "Invalid 'dimensions': {v}; this model produces {dim}-dimensional embeddings only."
            ),
            ))
        }
    }
    let embedder = handle.embedder.clone();
    let tokens = blocking(move || {
        texts
            .iter()
            .map(|t| embedder.tokenize(t).map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let prompt_tokens: usize = tokens.iter().map(Vec::len).sum();
    if let Some(c) = &origin.ctx {
        c.begin(&state.served_model, false, 0, prompt_tokens, || {
            origin.prompt.clone().unwrap_or(Value::Null)
        });
    }
    let vectors = handle.embed(tokens).await.map_err(|e| {
        tracing::error!("embedding failed: {e}");
        ApiError::internal()
    })?;
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Relaxed);
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": state.served_model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}
