//! The accept loop: plain TCP or TLS (rustls), HTTP/1.1 with a header timeout (a client
//! that opens a connection and sends its headers slowly, or idles on a kept-alive
//! connection, is cut off), the peer address handed to the routes, a connection limit
//! with a reserve for the monitoring paths, and graceful shutdown that waits for
//! requests in flight while new connections are told 503.
//!
//! Connections, counted while open: below `--max-connections` they are served as
//! usual; the next [`RESERVE_CONNECTIONS`] are served for `/health`, `/ready` and
//! `/metrics` only (one request each, a short header timeout; any other path is a 503
//! with `Connection: close`); beyond those a connection is closed as soon as it is
//! accepted. So a flood of idle connections never takes the file descriptors the
//! monitoring paths need, and never leaves the listener unable to accept.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::error::ApiError;

/// A TLS acceptor from PEM files: the certificate chain (leaf first) and its private key
/// (PKCS#8, PKCS#1 or SEC1). Errors name the file and what is wrong with it.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block found", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            format!(
                "{} and {}: the key does not fit the certificate: {e}",
                cert.display(),
                key.display()
            )
        })?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Connections beyond `--max-connections` that are still served, for `/health`,
/// `/ready` and `/metrics` only.
pub const RESERVE_CONNECTIONS: usize = 16;

/// File descriptors the default connection limit leaves for everything that is not a
/// connection: the listener, the model file while it loads, the audit log and its
/// rotation, the keys file on SIGHUP, the runtime's epoll and wake-up descriptors, the
/// spare descriptor, stdio.
pub const FD_MARGIN: u64 = 64;

/// The default `--max-connections` never exceeds this, however high the open-file
/// limit: each connection costs memory too.
pub const DEFAULT_MAX_CONNECTIONS_CAP: usize = 65_536;

/// How long a connection in the reserve, or one accepted while draining, has for its
/// headers (and TLS handshake): it holds a scarce place, and a monitoring probe sends
/// its request as soon as it connects. Idle connections that filled the reserve leave
/// it this soon.
const SHORT_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit, where the
/// platform has one, and returns the soft limit now in force (`None` where it cannot be
/// read). The usual soft limit, 1024, is far below what a server with many clients needs,
/// while the hard limit is usually much higher.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct we pass, which we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            tracing::warn!(
                "cannot read the open-file limit: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let soft = lim.rlim_cur;
        // An unlimited hard limit is still capped by the kernel (nr_open on Linux,
        // OPEN_MAX on macOS): then lower targets are tried.
        for target in [
            lim.rlim_max,
            lim.rlim_max.min(1 << 20),
            lim.rlim_max.min(10_240),
        ] {
            if target <= soft {
                break;
            }
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: setrlimit reads the struct we pass.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                tracing::info!(from = soft, to = target, "open-file limit raised");
                #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on most targets, not all
                return Some(target as u64);
            }
        }
        tracing::info!(limit = soft, hard = lim.rlim_max, "open-file limit");
        #[allow(clippy::unnecessary_cast)]
        Some(soft as u64)
    }
    #[cfg(not(unix))]
    None
}

/// The default `--max-connections` for a process that may open `fd_limit` files: the
/// limit less [`FD_MARGIN`] and the [`RESERVE_CONNECTIONS`] (so 944 for the common 1024),
/// at least a quarter of the limit, at most [`DEFAULT_MAX_CONNECTIONS_CAP`]; 1024 where
/// the limit is unknown.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return 1024;
    };
    let room = limit
        .saturating_sub(FD_MARGIN + RESERVE_CONNECTIONS as u64)
        .max(limit / 4)
        .max(1);
    usize::try_from(room)
        .unwrap_or(usize::MAX)
        .min(DEFAULT_MAX_CONNECTIONS_CAP)
}

/// Whether `max` connections and the reserve fit in `fd_limit` open files with
/// [`FD_MARGIN`] to spare.
pub fn connections_fit(max: usize, fd_limit: Option<u64>) -> bool {
    fd_limit.is_none_or(|limit| {
        (max as u64).saturating_add(RESERVE_CONNECTIONS as u64 + FD_MARGIN) <= limit
    })
}

/// The accept loop's counters, shown on `/metrics`.
#[derive(Clone, Default)]
pub struct ConnectionCounts {
    /// Connections open now.
    pub open: Arc<AtomicU64>,
    /// Connections closed as soon as they were accepted: beyond the limit and its
    /// reserve, or taken off the backlog while the process was out of descriptors.
    pub refused: Arc<AtomicU64>,
    /// Requests answered 503 on a reserve connection (a path other than `/health`,
    /// `/ready`, `/metrics`).
    pub reserve_refused: Arc<AtomicU64>,
}

/// How the accept loop serves connections.
pub struct Listen {
    pub tls: Option<TlsAcceptor>,
    pub header_timeout: Duration,
    /// Connections served in full; [`RESERVE_CONNECTIONS`] more for the monitoring
    /// paths, then none.
    pub max_connections: usize,
    pub counts: ConnectionCounts,
}

/// How one connection is served.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// Every route, kept alive between requests.
    Full,
    /// Beyond the limit: one request, the monitoring paths only.
    Reserve,
    /// After SIGTERM/SIGINT: one request; the monitoring paths answer (`/ready` 503),
    /// anything else is 503.
    Draining,
}

impl Mode {
    /// The 503's message for a path this mode does not serve (`None`: served).
    fn refusal(self, path: &str) -> Option<&'static str> {
        if self == Mode::Full || matches!(path, "/health" | "/ready" | "/metrics") {
            return None;
        }
        Some(match self {
            Mode::Reserve => {
                "The server is at its connection limit; only /health, /ready and /metrics are served on this connection. Retry shortly."
            }
            _ => "The server is shutting down.",
        })
    }
}

/// The mode for a connection accepted with `open` others open (`None`: closed at once).
fn mode_for(open: usize, max: usize, draining: bool) -> Option<Mode> {
    if open >= max.saturating_add(RESERVE_CONNECTIONS) {
        None
    } else if draining {
        Some(Mode::Draining)
    } else if open >= max {
        Some(Mode::Reserve)
    } else {
        Some(Mode::Full)
    }
}

/// A 503 that ends its connection.
fn closing(message: &str) -> Response {
    let mut r = ApiError::unavailable(message).into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Whether an accept failed for want of file descriptors.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    return matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// One descriptor held open on /dev/null. When the process runs out, it is given up so
/// that a pending connection can be accepted and closed (its client learns at once,
/// instead of waiting in the backlog while the listener spins), then taken again.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Self {
        #[cfg(unix)]
        return Self(std::fs::File::open("/dev/null").ok());
        #[cfg(not(unix))]
        Self(None)
    }
}

/// Accepts connections, decides how each is served, and spawns its task.
struct Acceptor {
    listen: Listen,
    app: Router,
    spare: Spare,
    /// When the last warning about refused connections was logged (at most one per
    /// [`WARN_EVERY`], so a flood cannot flood the log too).
    warned: Option<std::time::Instant>,
}

const WARN_EVERY: Duration = Duration::from_secs(10);

impl Acceptor {
    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.warned = Some(std::time::Instant::now());
            tracing::warn!("{message}");
        }
    }

    async fn take(
        &mut self,
        listener: &TcpListener,
        accepted: std::io::Result<(TcpStream, std::net::SocketAddr)>,
        draining: bool,
        graceful: Option<&GracefulShutdown>,
    ) {
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => return self.accept_failed(listener, e).await,
        };
        let open = self.listen.counts.open.load(Relaxed) as usize;
        let max = self.listen.max_connections;
        let Some(mode) = mode_for(open, max, draining) else {
            drop(tcp);
            let n = self.listen.counts.refused.fetch_add(1, Relaxed) + 1;
            self.warn(format_args!(
                "{open} connections open, at the limit ({max} + {RESERVE_CONNECTIONS} reserved): closing new ones ({n} so far)"
            ));
            return;
        };
        self.spawn(tcp, peer, mode, graceful.map(GracefulShutdown::watcher));
    }

    /// Out of descriptors: closes one pending connection through the spare descriptor
    /// (the caller loops at once for the next); otherwise pauses rather than spins.
    async fn accept_failed(&mut self, listener: &TcpListener, e: std::io::Error) {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionReset};
        if matches!(e.kind(), ConnectionAborted | ConnectionReset) {
            return; // that client gave up; the next one may be there
        }
        if out_of_descriptors(&e) {
            if let Some(spare) = self.spare.0.take() {
                drop(spare);
                let taken = listener.accept().now_or_never();
                let refused = matches!(taken, Some(Ok(_)));
                drop(taken);
                self.spare = Spare::open();
                if refused {
                    let n = self.listen.counts.refused.fetch_add(1, Relaxed) + 1;
                    self.warn(format_args!(
                        "out of file descriptors ({e}): closing new connections ({n} so far); lower --max-connections or raise the open-file limit"
                    ));
                    return;
                }
            } else {
                self.spare = Spare::open();
            }
        }
        self.warn(format_args!("accept failed: {e}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn spawn(
        &self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
        mode: Mode,
        watcher: Option<Watcher>,
    ) {
        // Each streamed token goes out at once, not held back by Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let app = self.app.clone();
        let reserve_refused = self.listen.counts.reserve_refused.clone();
        let service = tower::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            let refusal = mode.refusal(req.uri().path());
            if refusal.is_some() && mode == Mode::Reserve {
                reserve_refused.fetch_add(1, Relaxed);
            }
            async move {
                match refusal {
                    Some(message) => Ok::<_, Infallible>(closing(message)),
                    None => tower::ServiceExt::oneshot(app, req).await,
                }
            }
        });
        let service = TowerToHyperService::new(service);
        let header_timeout = match mode {
            Mode::Full => self.listen.header_timeout,
            _ => SHORT_HEADER_TIMEOUT.min(self.listen.header_timeout),
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(mode == Mode::Full);
        let tls = self.listen.tls.clone();
        let open = OpenConnection::new(self.listen.counts.open.clone());
        tokio::spawn(async move {
            let _open = open;
            let result = match tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(tcp), service);
                    match watcher {
                        Some(w) => w.watch(conn).await,
                        None => conn.await,
                    }
                }
                Some(acceptor) => {
                    // The handshake, too, must finish within the header timeout.
                    let stream =
                        match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    match watcher {
                        Some(w) => w.watch(conn).await,
                        None => conn.await,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// One count in the open-connections gauge, given back when the connection's task ends.
struct OpenConnection(Arc<AtomicU64>);

impl OpenConnection {
    fn new(count: Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Relaxed);
        Self(count)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Accepts connections until `shutdown` resolves; then lets the requests in flight
/// finish (each connection closes after its current response) while new connections
/// are still accepted and told 503, and returns once the old connections are done (the
/// caller bounds that wait).
pub async fn accept_loop(
    listener: TcpListener,
    listen: Listen,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut acceptor = Acceptor {
        listen,
        app,
        spare: Spare::open(),
        warned: None,
    };
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                acceptor.take(&listener, accepted, false, Some(&graceful)).await;
            }
            _ = &mut shutdown => break,
        }
    }
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                acceptor.take(&listener, accepted, true, None).await;
            }
            () = &mut drained => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_beyond_the_limit_get_the_reserve_then_nothing() {
        assert_eq!(mode_for(0, 20, false), Some(Mode::Full));
        assert_eq!(mode_for(19, 20, false), Some(Mode::Full));
        assert_eq!(mode_for(20, 20, false), Some(Mode::Reserve));
        assert_eq!(mode_for(35, 20, false), Some(Mode::Reserve));
        assert_eq!(mode_for(36, 20, false), None);
        assert_eq!(mode_for(3, 20, true), Some(Mode::Draining));
        assert_eq!(mode_for(36, 20, true), None);
        assert_eq!(mode_for(0, usize::MAX, false), Some(Mode::Full));
    }

    #[test]
    fn the_reserve_and_the_drain_serve_the_monitoring_paths_only() {
        for path in ["/health", "/ready", "/metrics"] {
            assert_eq!(Mode::Reserve.refusal(path), None);
            assert_eq!(Mode::Draining.refusal(path), None);
        }
        for path in ["/v1/models", "/v1/chat/completions", "/health/x", "/"] {
            assert_eq!(Mode::Full.refusal(path), None);
            assert!(Mode::Reserve
                .refusal(path)
                .unwrap()
                .contains("connection limit"));
            assert_eq!(
                Mode::Draining.refusal(path),
                Some("The server is shutting down.")
            );
        }
        let r = closing("x");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::CONNECTION], "close");
        assert!(r.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn the_default_limit_leaves_room_for_the_reserve_and_other_files() {
        assert_eq!(default_max_connections(Some(1024)), 944);
        assert_eq!(default_max_connections(Some(256)), 176);
        assert!(connections_fit(944, Some(1024)));
        assert!(!connections_fit(945, Some(1024)));
        assert_eq!(default_max_connections(Some(100)), 25);
        assert_eq!(default_max_connections(Some(0)), 1);
        assert_eq!(
            default_max_connections(Some(1 << 20)),
            DEFAULT_MAX_CONNECTIONS_CAP
        );
        assert_eq!(default_max_connections(None), 1024);
        assert!(connections_fit(usize::MAX, None));
    }
}
