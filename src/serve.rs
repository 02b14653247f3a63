//! `hearth serve`: the OpenAI-compatible server over one model.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hearth_engine::scheduler::{self, SchedulerConfig};
use hearth_engine::LoadedModel;
use hearth_server::{AppState, AuditConfig, AuditLog, Engine, Policy, RequestLimits, ServerConfig};

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "HEARTH_HOST")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080, env = "HEARTH_PORT")]
    port: u16,
    /// An accepted API key (repeatable); HEARTH_API_KEYS takes a comma-separated list.
    /// With no keys, no authentication.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// The model's name in the API (default: the model file's name without extension).
    #[arg(long)]
    served_model_name: Option<String>,
    /// KV-cache pool size in MiB (default: a quarter of physical memory, at most what
    /// --max-running full-context sequences need).
    #[arg(long)]
    kv_cache_mb: Option<usize>,
    /// Requests that may wait for a slot; more get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 32)]
    max_running: usize,
    /// Sequences (choices, queued or running) one API key may have at once, or without
    /// keys one client address; more get 429 (default: --max-running or a quarter of
    /// --max-queue, whichever is more).
    #[arg(long)]
    max_sequences_per_key: Option<usize>,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// A keys file (TOML, managed with `hearth keys`): named keys stored as hashes, with
    /// the models each may use and its limits. Reread on SIGHUP.
    #[arg(long, env = "HEARTH_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Append one hash-chained JSON line per request to this file.
    #[arg(long, env = "HEARTH_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Also record prompt and completion text in the audit log.
    #[arg(long, requires = "audit_log")]
    audit_content: bool,
    /// When audit lines are forced to disk: always, never, or an interval (1s, 200ms).
    #[arg(long, default_value = "1s", requires = "audit_log")]
    audit_fsync: hearth_server::Fsync,
    /// Rotate the audit log when it reaches this size (bytes, or with K, M or G); the
    /// full file becomes PATH.N and the chain continues in PATH.
    #[arg(long, requires = "audit_log", value_parser = parse_size)]
    audit_rotate_size: Option<u64>,
    /// Serve HTTPS: the certificate chain (PEM), with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM), with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a connection has to send a request's headers (and finish its TLS
    /// handshake), also after idling between requests.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request has to send its whole body.
    #[arg(long, default_value_t = 30)]
    body_timeout: u64,
    /// Largest request body, in KiB.
    #[arg(long, default_value_t = 4096)]
    max_body_kb: usize,
    /// Longest prompt accepted, in tokens (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Most tokens a request may generate per choice; also the default when a request
    /// sets no max_tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
}

/// `4096`, `512K`, `64M`, `2G` (powers of 1024) as bytes; at least 1.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 30),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a size such as 1048576, 512K, 64M or 2G"))
}

impl ServeArgs {
    pub fn model_args(&self) -> &ModelArgs {
        &self.model
    }
}

/// Blocks in the KV pool, from `--kv-cache-mb` or the default rule.
fn kv_blocks(args: &ServeArgs, model: &LoadedModel) -> anyhow::Result<usize> {
    let block = model.model.kv_block_bytes();
    let full = hearth_engine::KvCache::blocks_for(model.context_length()) * args.max_running;
    let blocks = match args.kv_cache_mb {
        Some(mb) => {
            let blocks = mb.checked_mul(1 << 20).map_or(usize::MAX, |b| b / block);
            if blocks == 0 {
                anyhow::bail!(
                    "--kv-cache-mb {mb} is less than one KV block ({} KiB)",
                    block.div_ceil(1024)
                );
            }
            blocks
        }
        None => {
            let quarter =
                hearth_server::proc_bytes("/proc/meminfo", "MemTotal").unwrap_or(4 << 30) / 4;
            (quarter as usize / block).clamp(1, full.max(1))
        }
    };
    Ok(blocks)
}

pub fn serve(args: ServeArgs, pool: rayon::ThreadPool) -> anyhow::Result<()> {
    let path = hearth_models::locate::resolve_model(args.model.model.as_deref())?;
    let device = hearth_engine::parse_device(&args.model.device)?;
    if args.max_running == 0 || args.max_queue == 0 || args.max_sequences_per_key == Some(0) {
        anyhow::bail!("--max-running, --max-queue and --max-sequences-per-key must be at least 1");
    }
    let served = args.served_model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let mut keys: Vec<String> = args.api_keys.iter().map(|k| k.trim().to_owned()).collect();
    if let Ok(env) = std::env::var("HEARTH_API_KEYS") {
        keys.extend(
            env.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from),
        );
    }
    if keys.iter().any(String::is_empty) {
        anyhow::bail!("an empty --api-key is not allowed");
    }
    let secs = |name: &str, s: u64| {
        if s == 0 {
            anyhow::bail!("--{name} must be at least 1 second");
        }
        Ok(Duration::from_secs(s))
    };
    if args.max_body_kb == 0 || args.max_prompt_tokens == Some(0) || args.max_tokens == Some(0) {
        anyhow::bail!("--max-body-kb, --max-prompt-tokens and --max-tokens must be at least 1");
    }
    let limits = RequestLimits {
        max_body_bytes: args.max_body_kb.saturating_mul(1024),
        body_timeout: secs("body-timeout", args.body_timeout)?,
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens: args.max_tokens,
    };
    let audit = match &args.audit_log {
        Some(path) => Some(
            AuditLog::open(AuditConfig {
                path: path.clone(),
                fsync: args.audit_fsync,
                max_bytes: args.audit_rotate_size,
                content: args.audit_content,
            })
            .map_err(anyhow::Error::msg)
            .context("cannot open the audit log")?,
        ),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(hearth_server::tls_acceptor(cert, key).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let policy = Policy {
        plain_keys: keys,
        keys_file: args.api_keys_file.clone(),
        audit,
        limits,
    };
    let state = AppState::new(served.clone(), policy).map_err(anyhow::Error::msg)?;
    let config = ServerConfig {
        addr: SocketAddr::new(args.host, args.port),
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
        tls,
        header_timeout: secs("header-timeout", args.header_timeout)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hearth-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    // Load in the background: the listener answers /health (and 503 on /ready) meanwhile.
    let started = Instant::now();
    let loader_state = state.clone();
    let (pin, require_pin) = (args.model.sha256.clone(), args.model.require_pin);
    let kv_dtype = args.model.kv_cache_dtype;
    let options = args.model.load_options()?;
    let pool = Arc::new(pool);
    std::thread::Builder::new()
        .name("hearth-loader".into())
        .spawn(move || {
            let result = (|| -> anyhow::Result<()> {
                crate::models::check_pin(&path, pin.as_deref(), require_pin)?;
                if hearth_engine::Embedder::is_embedding_folder(&path) {
                    let embedder = hearth_engine::Embedder::load(&path, &device)?;
                    let handle = hearth_engine::EmbedHandle::spawn(embedder, 64, pool)?;
                    tracing::info!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        dim = handle.embedder.dim(),
                        "embedding model loaded; ready"
                    );
                    loader_state.set_embedder(handle);
                    return Ok(());
                }
                let mut model = LoadedModel::load_with(&path, &device, options)
                    .with_context(|| format!("cannot load {}", path.display()))?;
                model.model.set_kv_dtype(kv_dtype);
                let model = Arc::new(model);
                let sched = SchedulerConfig {
                    max_running: args.max_running,
                    max_queue: args.max_queue,
                    max_per_owner: args.max_sequences_per_key,
                    kv_blocks: Some(kv_blocks(&args, &model)?),
                    ..SchedulerConfig::default()
                };
                let (handle, _thread) = scheduler::spawn(model.clone(), sched, pool)?;
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    kv_cache_tokens = handle.kv_capacity_tokens(),
                    "model loaded; ready"
                );
                loader_state.set_engine(Engine {
                    model,
                    scheduler: handle,
                });
                Ok(())
            })();
            if let Err(e) = result {
                let msg = format!("{e:#}").replace('\n', " ");
                eprintln!("error: {msg}");
                std::process::exit(1);
            }
        })
        .context("cannot start the loader thread")?;

    let addr = config.addr;
    runtime
        .block_on(hearth_server::serve(config, state.clone(), |bound| {
            println!("hearth: listening on {scheme}://{bound}");
            let _ = std::io::stdout().flush();
        }))
        .with_context(|| format!("cannot serve on {addr}"))?;
    // In-flight work past the grace period is abandoned with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(100));
    state.close_audit();
    Ok(())
}
