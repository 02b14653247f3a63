//! `hearth-server` speaks HTTP: the OpenAI-compatible routes and their wire types, SSE
//! streaming, API keys, limits, health and metrics. It turns requests into token ids and
//! engine requests and engine events back into JSON; it knows nothing of tensors.
//!
//! The listener is up before the model is loaded: `/health` answers at once, `/ready`
//! and the generation endpoints say 503 until the engine is there.

pub mod audit;
mod choice;
mod error;
mod gate;
pub mod keys;
mod listen;
mod metrics;
mod request;
mod routes;
mod structured;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hearth_engine::{LoadedModel, SchedulerHandle};

pub use audit::{AuditConfig, AuditLog, Fsync};
pub use error::ApiError;
pub use gate::RequestCtx;
pub use keys::{KeyStore, KeysFile};
pub use listen::{
    connections_fit, default_max_connections, raise_fd_limit, tls_acceptor, RESERVE_CONNECTIONS,
};
pub use metrics::proc_bytes;
pub use tokio_rustls::TlsAcceptor;

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
    // Grammars as clients may send them (deep schemas, long rule chains) through the
    // size and nesting checks that run before any compilation.
    let limits = hearth_engine::GrammarLimits::default();
    if let Ok(spec) = structured::output_spec(&body) {
        if let Some(g) = spec.grammar {
            let _ = limits.check(&g);
        }
    }
    if let Ok(Some(t)) = structured::tools(&body) {
        for f in [
            hearth_models::ToolFormat::Hermes,
            hearth_models::ToolFormat::Llama3,
            hearth_models::ToolFormat::Mistral,
        ] {
            if let Some(g) = t.grammar(f, None) {
                let _ = limits.check(&g);
            }
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

/// Largest request body accepted by default.
pub const MAX_BODY_BYTES: usize = 4 << 20;

const FINGERPRINT: &str = concat!("hearth-", env!("CARGO_PKG_VERSION"));

/// The model and its scheduler, once loaded.
pub struct Engine {
    pub model: Arc<LoadedModel>,
    pub scheduler: SchedulerHandle,
}

/// The model file that serves requests, as audit records name it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// The file's (or model folder's) name.
    pub name: String,
    /// Its SHA-256, computed at load (for a folder: of its `manifest.toml` pins).
    pub sha256: Option<String>,
}

/// How the listener is set up.
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Serve HTTPS with this acceptor.
    pub tls: Option<TlsAcceptor>,
    /// A connection must deliver a request's headers (and its TLS handshake) within this
    /// long, also after idling between requests.
    pub header_timeout: Duration,
    /// Connections served in full; [`RESERVE_CONNECTIONS`] more are served for
    /// `/health`, `/ready` and `/metrics` only, and any beyond are closed at once.
    pub max_connections: usize,
}

/// Bounds on what one request may ask.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    /// The whole body must arrive within this long (else 408).
    pub body_timeout: Duration,
    /// Longest prompt accepted, in tokens (the context length applies anyway).
    pub max_prompt_tokens: Option<usize>,
    /// Most tokens one request may generate per choice; also the default `max_tokens`.
    pub max_tokens: Option<usize>,
    /// What a client's grammar (`response_format`, `grammar`, `regex`, `guided_*`, the
    /// grammar made from `tools`) may cost to compile.
    pub grammar: hearth_engine::GrammarLimits,
    /// Text in a raw `/v1/completions` prompt that spells a control token becomes that
    /// token (the default, as llama.cpp and vLLM do); off, it is tokenized as text.
    /// Chat messages are always tokenized as text.
    pub completions_special_tokens: bool,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: MAX_BODY_BYTES,
            body_timeout: Duration::from_secs(30),
            max_prompt_tokens: None,
            max_tokens: None,
            grammar: hearth_engine::GrammarLimits::default(),
            completions_special_tokens: true,
        }
    }
}

/// Who may call, what is recorded, what a request may ask.
#[derive(Default)]
pub struct Policy {
    /// Plain keys (`--api-key`, `HEARTH_API_KEYS`).
    pub plain_keys: Vec<String>,
    /// The keys file (`--api-keys-file`), reread on SIGHUP.
    pub keys_file: Option<PathBuf>,
    pub audit: Option<AuditLog>,
    pub limits: RequestLimits,
}

/// Everything the handlers share.
pub struct AppState {
    engine: OnceLock<Engine>,
    /// Set instead of `engine` when the model is a sentence-embedding encoder.
    embedder: OnceLock<hearth_engine::EmbedHandle>,
    served_model: String,
    /// The file behind `served_model`, set at load.
    model_file: OnceLock<Arc<ModelFile>>,
    keys: RwLock<Arc<KeyStore>>,
    plain_keys: Vec<String>,
    keys_file: Option<PathBuf>,
    limiter: Arc<keys::Limiter>,
    audit: Option<Arc<AuditLog>>,
    limits: RequestLimits,
    metrics: metrics::Metrics,
    draining: AtomicBool,
    /// Turns true when the shutdown grace period is over: streams still running end
    /// (a final chunk, an error event, `[DONE]`), whole replies not yet sent are 503.
    deadline: tokio::sync::watch::Sender<bool>,
    created: u64,
}

impl AppState {
    /// The state for serving `served_model` under `policy`; reads the keys file (errors
    /// name it).
    pub fn new(served_model: String, policy: Policy) -> Result<Arc<Self>, String> {
        let store = Self::read_keys(policy.keys_file.as_deref(), &policy.plain_keys)?;
        Ok(Arc::new(Self {
            engine: OnceLock::new(),
            embedder: OnceLock::new(),
            served_model,
            model_file: OnceLock::new(),
            keys: RwLock::new(Arc::new(store)),
            plain_keys: policy.plain_keys,
            keys_file: policy.keys_file,
            limiter: Arc::default(),
            audit: policy.audit.map(Arc::new),
            limits: policy.limits,
            metrics: metrics::Metrics::default(),
            draining: AtomicBool::new(false),
            deadline: tokio::sync::watch::channel(false).0,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }))
    }

    fn read_keys(file: Option<&std::path::Path>, plain: &[String]) -> Result<KeyStore, String> {
        let parsed = match file {
            Some(p) => Some(KeysFile::read(p).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(KeyStore::new(parsed.as_ref(), plain))
    }

    /// The keys in force now.
    pub fn keys(&self) -> Arc<KeyStore> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rereads the keys file and swaps the key set whole; on an error the old set stays.
    /// Requests in flight keep the identity they were admitted with. Returns the number
    /// of keys now known.
    pub fn reload_keys(&self) -> Result<usize, String> {
        let store = Self::read_keys(self.keys_file.as_deref(), &self.plain_keys)?;
        let n = store.key_count();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(store);
        Ok(n)
    }

    /// Names the model file (and its hash) in every later audit record; set before the
    /// engine or embedder.
    pub fn set_model_file(&self, file: ModelFile) {
        let _ = self.model_file.set(Arc::new(file));
    }

    /// Makes the engine available; `/ready` turns 200.
    pub fn set_engine(&self, engine: Engine) {
        let _ = self.engine.set(engine);
    }

    /// Makes an embedding model available (`/v1/embeddings`); `/ready` turns 200.
    pub fn set_embedder(&self, embedder: hearth_engine::EmbedHandle) {
        let _ = self.embedder.set(embedder);
    }

    /// Resolves once the shutdown grace period is over.
    async fn past_deadline(&self) {
        let mut rx = self.deadline.subscribe();
        if rx.wait_for(|&over| over).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Writes out the audit records still queued and stops the audit writer.
    pub fn close_audit(&self) {
        if let Some(a) = &self.audit {
            a.close();
        }
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Relaxed) {
        return ApiError::unavailable("The server is shutting down.").into_response();
    }
    if state.embedder.get().is_some() {
        return axum::Json(serde_json::json!({"status": "ready"})).into_response();
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
    let mut body = state.metrics.render(stats.as_deref(), &state.served_model);
    if let Some(e) = state.embedder.get() {
        body.push_str(&metrics::render_embeddings(&e.stats));
    }
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
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gate::gate,
        ))
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

/// Rereads the keys file on each SIGHUP, for as long as the server runs.
fn reload_on_hangup(state: Arc<AppState>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; keys are read at start only");
            return;
        };
        while hup.recv().await.is_some() {
            if state.keys_file.is_none() {
                tracing::warn!("SIGHUP: no --api-keys-file to reload");
                continue;
            }
            match state.reload_keys() {
                Ok(n) => tracing::warn!("SIGHUP: keys reloaded ({n} keys)"),
                Err(e) => tracing::error!("SIGHUP: keys not reloaded, the old ones stay: {e}"),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = state;
}

/// How long, after the grace period, the requests cut at its end have to send their last
/// events (a stream's final chunk, error event and `[DONE]`; a whole reply's 503).
const CUT_FLUSH: Duration = Duration::from_secs(2);

/// Serves until SIGINT/SIGTERM: then lets in-flight requests finish within
/// `shutdown_grace` (new connections meanwhile get 503), cuts those still running (they see
/// `AppState::past_deadline`), waits up to [`CUT_FLUSH`] for them to say so, and
/// returns. `on_bound` gets the bound address (port 0 picks a free one).
pub async fn serve(
    config: ServerConfig,
    state: Arc<AppState>,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    on_bound(listener.local_addr()?);
    // SIGHUP rereads the keys file (and never ends the server).
    reload_on_hangup(state.clone());
    let app = router(state.clone());
    let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
    let drain_state = state.clone();
    let listen = listen::Listen {
        tls: config.tls,
        header_timeout: config.header_timeout,
        max_connections: config.max_connections,
        counts: state.metrics.connections.clone(),
    };
    let server = listen::accept_loop(listener, listen, app, async move {
        shutdown_signal().await;
        drain_state.draining.store(true, Relaxed);
        tracing::info!("shutting down: new requests get 503, finishing in-flight ones");
        let _ = signalled_tx.send(true);
    });
    let grace = config.shutdown_grace;
    let deadline = async move {
        let mut rx = signalled_rx;
        let _ = rx.wait_for(|&s| s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(()),
        _ = deadline => {}
    }
    tracing::warn!("shutdown grace period over; cutting in-flight requests");
    state.deadline.send_replace(true);
    if tokio::time::timeout(CUT_FLUSH, &mut server).await.is_err() {
        tracing::warn!("connections still open {CUT_FLUSH:?} after the deadline are dropped");
    }
    Ok(())
}
