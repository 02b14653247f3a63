//! What every request passes before a handler: its key (who, which models), its key's
//! limits, and its body read within the body timeout; and what it leaves behind: one
//! audit record and its tokens charged to its key, written when the request is over
//! (for a stream, when the last token went out or the client left).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::audit::AuditLog;
use crate::error::{ApiError, ErrorCode};
use crate::keys::{Identity, Limiter, Lookup, Permit, Reservation};
use crate::{AppState, ModelFile};

/// Longest text taken from a request body into its audit record (`model`, `user`).
const MAX_ECHO: usize = 256;

/// One request's identity and what it came to, shared by the gate and the handler.
pub struct RequestCtx {
    pub identity: Option<Arc<Identity>>,
    /// Pairs the request's `started` and `finished` audit lines.
    id: String,
    /// The model file that serves it (none while loading).
    model_file: Option<Arc<ModelFile>>,
    permit: Mutex<Option<Permit>>,
    client: Option<SocketAddr>,
    method: Method,
    path: String,
    started: Instant,
    time: SystemTime,
    fill: Mutex<Fill>,
    limiter: Arc<Limiter>,
    audit: Option<Arc<AuditLog>>,
}

#[derive(Default)]
struct Fill {
    status: u16,
    error: Option<&'static str>,
    model: Option<String>,
    stream: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Tokens held of the key's budget since the request was accepted.
    reserved: u64,
    /// One per choice; `None` until it finishes (a choice left unfinished was cancelled).
    finishes: Vec<Option<&'static str>>,
    prompt: Option<Value>,
    completions: Vec<String>,
    /// The body's `model` and `user`, as sent (cut short).
    requested_model: Option<String>,
    user: Option<String>,
}

/// At most `MAX_ECHO` bytes of `s`, cut at a character boundary.
fn echo(s: &str) -> String {
    let mut end = s.len().min(MAX_ECHO);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl RequestCtx {
    /// Whether prompt and completion text go into the audit log.
    pub fn wants_content(&self) -> bool {
        self.audit.as_ref().is_some_and(|a| a.content)
    }

    fn fill(&self) -> std::sync::MutexGuard<'_, Fill> {
        self.fill.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the body's `model` and OpenAI `user` fields for the audit record.
    pub fn requested(&self, body: &Value) {
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(echo);
        let mut f = self.fill();
        f.requested_model = field("model");
        f.user = field("user");
    }

    /// Whose the request is, for the scheduler's fair shares and per-owner cap: its key's
    /// name, or without keys the client's address (an IPv6 client by its /64, which one
    /// host commonly holds whole); requests with neither share one.
    pub fn owner(&self) -> Arc<str> {
        match (&self.identity, self.client) {
            (Some(i), _) => format!("key:{}", i.name).into(),
            (None, Some(c)) => match c.ip() {
                std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                    let s = v6.segments();
                    format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]).into()
                }
                ip => format!("ip:{}", ip.to_canonical()).into(),
            },
            (None, None) => "".into(),
        }
    }

    /// The key's tokens per minute, if it has that limit.
    pub fn tokens_per_minute(&self) -> Option<u64> {
        self.identity.as_ref()?.limits.tokens_per_minute
    }

    /// Holds `tokens` (the most the request can use) of its key's token budget until the
    /// request ends, when what it did not use is given back. Refused with 429 when the
    /// budget has not that much free now, 400 (`param`) when it never could.
    pub fn reserve(&self, tokens: u64, param: &'static str) -> Result<(), ApiError> {
        let Some(who) = &self.identity else {
            return Ok(());
        };
        match self.limiter.reserve(who, tokens, Instant::now()) {
            Ok(held) => {
                self.fill().reserved += held;
                Ok(())
            }
            Err(Reservation::TooLarge { message }) => Err(ApiError::invalid(Some(param), message)),
            Err(Reservation::Later(r)) => {
                Err(ApiError::rate_limited(r.message, r.retry_after_secs))
            }
        }
    }

    /// The request was accepted for generation: its model, shape and prompt.
    pub fn begin(
        &self,
        model: &str,
        stream: bool,
        choices: usize,
        prompt_tokens: usize,
        prompt: impl FnOnce() -> Value,
    ) {
        let content = self.wants_content();
        let mut f = self.fill();
        f.model = Some(model.to_owned());
        f.stream = stream;
        f.prompt_tokens = prompt_tokens as u64;
        f.finishes = vec![None; choices];
        if content {
            f.prompt = Some(prompt());
            f.completions = vec![String::new(); choices];
        }
    }

    /// Choice `index` produced a token whose text is `text` (kept only with
    /// `--audit-content`).
    pub fn token(&self, index: usize, text: &str) {
        let content = self.wants_content();
        let mut f = self.fill();
        f.completion_tokens += 1;
        if content {
            if let Some(c) = f.completions.get_mut(index) {
                c.push_str(text);
            }
        }
    }

    /// Text choice `index` released at its end (held back until then; kept only with
    /// `--audit-content`).
    pub fn text(&self, index: usize, text: &str) {
        if !self.wants_content() || text.is_empty() {
            return;
        }
        if let Some(c) = self.fill().completions.get_mut(index) {
            c.push_str(text);
        }
    }

    /// Choice `index` ended with `finish`.
    pub fn finish(&self, index: usize, finish: &'static str) {
        if let Some(slot) = self.fill().finishes.get_mut(index) {
            *slot = Some(finish);
        }
    }

    fn audited(&self, status: u16) -> bool {
        self.path.starts_with("/v1/") || matches!(status, 401 | 403 | 408 | 413 | 429)
    }

    /// What both of the request's lines say: who, from where, what.
    fn header(&self, event: &str) -> Map<String, Value> {
        let mut r = Map::new();
        r.insert("event".into(), event.into());
        r.insert("id".into(), self.id.clone().into());
        r.insert(
            "time".into(),
            hearth_models::clock::rfc3339_millis(self.time).into(),
        );
        r.insert(
            "key".into(),
            self.identity.as_ref().map(|i| i.name.clone()).into(),
        );
        r.insert("client".into(), self.client.map(|c| c.to_string()).into());
        r.insert("method".into(), self.method.as_str().into());
        r.insert("endpoint".into(), self.path.clone().into());
        r
    }

    fn record(&self, f: &Fill) -> Map<String, Value> {
        let finishes: Vec<&str> = f
            .finishes
            .iter()
            .map(|x| x.unwrap_or("cancelled"))
            .collect();
        let mut r = self.header("finished");
        r.insert("model".into(), f.model.clone().into());
        let file = self.model_file.as_deref();
        r.insert("model_file".into(), file.map(|m| m.name.clone()).into());
        r.insert(
            "model_sha256".into(),
            file.and_then(|m| m.sha256.clone()).into(),
        );
        if let Some(m) = &f.requested_model {
            r.insert("requested_model".into(), m.clone().into());
        }
        if let Some(u) = &f.user {
            r.insert("user".into(), u.clone().into());
        }
        // No response was made: the client went away while the request was handled
        // (499, as nginx says it).
        let (status, error) = match f.status {
            0 => (499, Some("client_closed_request")),
            s => (s, f.error),
        };
        r.insert("status".into(), status.into());
        if let Some(e) = error {
            r.insert("error".into(), e.into());
        }
        r.insert("stream".into(), f.stream.into());
        r.insert("prompt_tokens".into(), f.prompt_tokens.into());
        r.insert("completion_tokens".into(), f.completion_tokens.into());
        let ms = (self.started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
        r.insert("latency_ms".into(), json!(ms));
        r.insert("finish_reasons".into(), finishes.into());
        if let Some(p) = &f.prompt {
            r.insert("prompt".into(), p.clone());
            r.insert("completions".into(), f.completions.clone().into());
        }
        r
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        let f = std::mem::take(&mut *self.fill());
        if let Some(who) = &self.identity {
            let used = f.prompt_tokens + f.completion_tokens;
            self.limiter.settle(who, f.reserved, used, Instant::now());
        }
        // Its concurrency place is free once it is over.
        self.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(audit) = &self.audit {
            if self.audited(f.status) {
                audit.record(self.record(&f));
            }
        }
    }
}

/// A random id for the request's audit lines.
fn request_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("req-{}", hearth_models::pin::hex(&b))
}

/// Whether `path` is a generation endpoint (limits apply to these).
fn generates(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
    )
}

/// The endpoint label for metrics (a fixed set, so labels cannot grow without bound).
pub fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        "/health" => "health",
        "/ready" => "ready",
        "/metrics" => "metrics",
        p if p == "/v1/models" || p.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

/// The key, its models and limits, the body within its timeout; then the handler; then
/// the response counted and its status noted for the audit record.
pub async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let mut ctx = RequestCtx {
        identity: None,
        id: request_id(),
        model_file: state.model_file.get().cloned(),
        permit: Mutex::new(None),
        client,
        method: req.method().clone(),
        path: path.clone(),
        started: Instant::now(),
        time: SystemTime::now(),
        fill: Mutex::new(Fill::default()),
        limiter: state.limiter.clone(),
        audit: state.audit.clone(),
    };
    let response = match admit(&state, &mut ctx, &req) {
        Err(e) => e.into_response(),
        Ok(()) => {
            // Admitted: a line now, so a request the process dies under is not lost.
            if let Some(audit) = ctx.audit.as_ref().filter(|_| ctx.audited(0)) {
                audit.record(ctx.header("started"));
            }
            let ctx = Arc::new(ctx);
            match read_body(&state, req).await {
                Err(e) => {
                    let r = e.into_response();
                    note(&ctx, &r);
                    r
                }
                Ok(mut req) => {
                    req.extensions_mut().insert(ctx.clone());
                    let r = handle(req, next).await;
                    note(&ctx, &r);
                    r
                }
            }
        }
    };
    state
        .metrics
        .count_request(endpoint_label(&path), response.status().as_u16());
    response
}

/// Runs the handler; a panic in it becomes a 500 (logged) instead of a dropped
/// connection: no input can take down more than its own request.
async fn handle(req: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("a request handler panicked: {what}");
            ApiError::internal().into_response()
        }
    }
}

/// Notes the response's status (and error code) on the request's record.
fn note(ctx: &RequestCtx, r: &Response) {
    let mut f = ctx.fill();
    f.status = r.status().as_u16();
    f.error = r.extensions().get::<ErrorCode>().map(|c| c.0);
}

/// Authentication, model scope and limits; the refusal is also noted on `ctx`'s record
/// (written when `ctx` drops).
fn admit(state: &AppState, ctx: &mut RequestCtx, req: &Request) -> Result<(), ApiError> {
    let path = req.uri().path();
    if path == "/health" || path == "/ready" {
        return Ok(());
    }
    let keys = state.keys();
    if !keys.required() {
        return Ok(());
    }
    let refuse = |ctx: &mut RequestCtx, e: ApiError| {
        let f = ctx.fill.get_mut().unwrap_or_else(|e| e.into_inner());
        f.status = e.status.as_u16();
        f.error = e.code.or(Some(e.kind));
        Err(e)
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(presented) = presented else {
        return refuse(ctx, ApiError::unauthorized(true));
    };
    let identity = match keys.lookup(presented) {
        Lookup::Valid(i) => i.clone(),
        Lookup::Revoked(i) => {
            // The record names the revoked key that was tried.
            ctx.identity = Some(i.clone());
            return refuse(ctx, ApiError::unauthorized(false));
        }
        Lookup::Unknown => return refuse(ctx, ApiError::unauthorized(false)),
    };
    ctx.identity = Some(identity.clone());
    if generates(path) {
        if !identity.may_use(&state.served_model) {
            return refuse(
                ctx,
                ApiError::model_forbidden(&identity.name, &state.served_model),
            );
        }
        match state.limiter.admit(&identity, Instant::now()) {
            Ok(p) => *ctx.permit.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(p),
            Err(r) => return refuse(ctx, ApiError::rate_limited(r.message, r.retry_after_secs)),
        }
    }
    Ok(())
}

/// Reads a request body whole within the body timeout (a client that trickles it is cut
/// off with 408) and up to the size limit (413).
async fn read_body(state: &AppState, req: Request) -> Result<Request, ApiError> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let limit = state.limits.max_body_bytes;
    match tokio::time::timeout(state.limits.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::body_timeout(state.limits.body_timeout)),
        Ok(Err(e)) => {
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            let mut too_large = false;
            while let Some(s) = source {
                too_large |= s.to_string().contains("length limit");
                source = s.source();
            }
            if too_large {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::invalid(
                    None,
                    format!("Cannot read the request body: {e}"),
                ))
            }
        }
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_is_a_500() {
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let app = axum::Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(axum::middleware::from_fn(handle));
        for (path, status) in [("/boom", 500), ("/fine", 200), ("/boom", 500)] {
            let req = Request::builder().uri(path).body(Body::empty()).unwrap();
            let r = app.clone().oneshot(req).await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{path}");
        }
    }
}
