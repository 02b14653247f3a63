//! `hearth-server` speaks HTTP: the OpenAI-compatible routes and their wire types, SSE
//! streaming, API keys, limits, health and metrics. It turns requests into token ids and
//! engine requests and engine events back into JSON; it knows nothing of tensors.
//!
//! The listener is up before the model is loaded: `/health` answers at once, `/ready`
//! and the generation endpoints say 503 until the engine is there.

mod choice;
mod error;
mod metrics;
mod request;
mod routes;
mod structured;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hearth_engine::{LoadedModel, SchedulerHandle};

pub use error::ApiError;
pub use metrics::proc_bytes;

/// Fuzzing entry: runs request bytes through every parser and check a handler would
/// (structured output and tools included), and the stop-sequence and tool-call parsers
/// over the body's `"pieces"` (an array of strings). Must never panic.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if !body.is_object() {
        return;
    }
    if let Ok(c) = request::CommonFields::parse(&body) {
        if let Ok(g) = c.generation(Some(3), 49152) {
            let pieces: Vec<String> = body
                .get("pieces")
                .and_then(|p| serde_json::from_value(p.clone()).ok())
                .unwrap_or_default();
            choice::check_stop_contract(g.stop, &pieces);
            hearth_models::tools::check_parser_contract(&pieces);
        }
    }
    let _ = structured::output_spec(&body);
    if let Ok(Some(t)) = structured::tools(&body) {
        for f in [
            hearth_models::ToolFormat::Hermes,
            hearth_models::ToolFormat::Llama3,
            hearth_models::ToolFormat::Mistral,
        ] {
            let _ = t.grammar(f, None);
        }
    }
    if let Ok(c) = request::ChatFields::parse(&body) {
        let _ = c.messages();
        let _ = c.logprobs();
    }
    if let Ok(c) = request::CompletionFields::parse(&body) {
        let _ = c.prompts();
        let _ = c.logprobs();
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;

const FINGERPRINT: &str = concat!("hearth-", env!("CARGO_PKG_VERSION"));

/// The model and its scheduler, once loaded.
pub struct Engine {
    pub model: Arc<LoadedModel>,
    pub scheduler: SchedulerHandle,
}

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// The model's name in the API.
    pub served_model: String,
    /// Accepted API keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
}

/// Everything the handlers share.
pub struct AppState {
    engine: OnceLock<Engine>,
    served_model: String,
    api_keys: Vec<Vec<u8>>,
    metrics: metrics::Metrics,
    draining: AtomicBool,
    created: u64,
}

impl AppState {
    pub fn new(served_model: String, api_keys: &[String]) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            served_model,
            api_keys: api_keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            metrics: metrics::Metrics::default(),
            draining: AtomicBool::new(false),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Makes the engine available; `/ready` turns 200.
    pub fn set_engine(&self, engine: Engine) {
        let _ = self.engine.set(engine);
    }
}

/// Equal, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Whether `presented` is one of `keys`; every key is compared, match or not.
fn key_matches(keys: &[Vec<u8>], presented: &[u8]) -> bool {
    keys.iter()
        .fold(false, |found, k| constant_time_eq(k, presented) | found)
}

/// The endpoint label for metrics (a fixed set, so labels cannot grow without bound).
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/health" => "health",
        "/ready" => "ready",
        "/metrics" => "metrics",
        p if p == "/v1/models" || p.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

/// API keys (all but /health and /ready), then counting the response by status.
async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let open = path == "/health" || path == "/ready";
    let response = if !open && !state.api_keys.is_empty() {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
            .map(str::trim);
        match presented {
            None => ApiError::unauthorized(true).into_response(),
            Some(k) if !key_matches(&state.api_keys, k.as_bytes()) => {
                ApiError::unauthorized(false).into_response()
            }
            Some(_) => next.run(req).await,
        }
    } else {
        next.run(req).await
    };
    state
        .metrics
        .count_request(endpoint_label(&path), response.status().as_u16());
    response
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Relaxed) {
        return ApiError::unavailable("The server is shutting down.").into_response();
    }
    match state.engine.get() {
        Some(e) if e.scheduler.is_running() => {
            axum::Json(serde_json::json!({"status": "ready"})).into_response()
        }
        Some(_) => ApiError::unavailable("The engine has stopped.").into_response(),
        None => ApiError::unavailable("The model is still loading.").into_response(),
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.get().map(|e| e.scheduler.stats().clone());
    let body = state.metrics.render(stats.as_deref(), &state.served_model);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// The routes, with auth, metrics and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serves until SIGINT/SIGTERM: then stops accepting, lets in-flight requests finish
/// within `shutdown_grace`, and returns. `on_bound` gets the bound address (port 0 picks
/// a free one).
pub async fn serve(
    config: ServerConfig,
    state: Arc<AppState>,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    on_bound(listener.local_addr()?);
    // Each streamed token goes out at once, not held back by Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    let app = router(state.clone());
    let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
    let drain_state = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        drain_state.draining.store(true, Relaxed);
        tracing::info!("shutting down: no new requests, finishing in-flight ones");
        let _ = signalled_tx.send(true);
    });
    let grace = config.shutdown_grace;
    let deadline = async move {
        let mut rx = signalled_rx;
        let _ = rx.wait_for(|&s| s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r,
        _ = deadline => {
            tracing::warn!("shutdown grace period over; cancelling in-flight requests");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        let keys = vec![b"secret-one".to_vec(), b"secret-two".to_vec()];
        assert!(key_matches(&keys, b"secret-two"));
        assert!(!key_matches(&keys, b"secret-tw"));
        assert!(!key_matches(&keys, b"secret-twO"));
        assert!(!key_matches(&keys, b""));
        assert!(!key_matches(&[], b"x"));
    }
}
