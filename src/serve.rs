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
    /// With no keys, no authentication. A key given here shows in `ps`: prefer
    /// --api-key-file, HEARTH_API_KEYS or --api-keys-file.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// A file of accepted API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "HEARTH_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
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
    /// keys one client address; more get 429 (default: --max-running plus a quarter of
    /// --max-queue, at least 128 where the queue holds them).
    #[arg(long)]
    max_sequences_per_key: Option<usize>,
    /// Seconds in-flight requests may run on after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Connections served at once; 16 more serve /health, /ready and /metrics only, and
    /// any beyond are closed at once (default: the open-file limit, raised to its hard
    /// limit at start, less 80; at most 65536).
    #[arg(long)]
    max_connections: Option<usize>,
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
    /// Key the audit chain with the secret in this file (hex, at least 32 bytes; mode
    /// 0600): each line gets an HMAC-SHA256 `mac`, so only the key holder can rebuild the
    /// chain. `hearth audit verify --key-file` checks it.
    #[arg(long, env = "HEARTH_AUDIT_KEY_FILE", requires = "audit_log")]
    audit_key_file: Option<PathBuf>,
    /// Sign audit checkpoints with this Ed25519 key (`hearth audit keygen`; mode 0600):
    /// every --audit-checkpoint-every lines and at shutdown, the latest also kept in
    /// AUDIT_LOG.checkpoint. `hearth audit verify --public-key` checks them.
    #[arg(long, env = "HEARTH_AUDIT_SIGNING_KEY", requires = "audit_log")]
    audit_signing_key: Option<PathBuf>,
    /// Lines between signed checkpoints.
    #[arg(long, default_value_t = 1000, requires = "audit_signing_key")]
    audit_checkpoint_every: u64,
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
    /// Largest grammar a request may send (response_format schema, grammar, regex,
    /// guided_*, the tools' schemas), in KiB.
    #[arg(long, default_value_t = 256)]
    max_grammar_kb: usize,
    /// Deepest nesting of a request's grammar: subschemas within subschemas (`$ref`s
    /// followed), or Lark rules referring to rules.
    #[arg(long, default_value_t = 128)]
    max_grammar_depth: usize,
    /// Seconds a request's grammar may take to compile (waiting for a free compiler
    /// included).
    #[arg(long, default_value_t = 10)]
    grammar_timeout: u64,
    /// Tokenize raw /v1/completions prompts with control-token text (`<|im_end|>`) as
    /// plain text. By default such text becomes the control token, as in llama.cpp and
    /// vLLM; chat messages are always tokenized as text.
    #[arg(long)]
    no_completions_special_tokens: bool,
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

/// The keys of an `--api-key-file`: one per line; blank lines and `#` comments skipped.
fn read_api_key_file(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API key file {}", path.display()))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            anyhow::bail!(
                "{}:{}: a key cannot contain spaces or control characters (one key per line)",
                path.display(),
                i + 1
            );
        }
        keys.push(key.to_owned());
    }
    if keys.is_empty() {
        anyhow::bail!("{}: no keys in the file", path.display());
    }
    Ok(keys)
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
    if !args.api_keys.is_empty() {
        eprintln!(
            "hearth: warning: --api-key puts the key on the command line, where `ps` shows it to every user; use --api-key-file, HEARTH_API_KEYS or --api-keys-file"
        );
    }
    if let Some(file) = &args.api_key_file {
        keys.extend(read_api_key_file(file)?);
    }
    let secs = |name: &str, s: u64| {
        if s == 0 {
            anyhow::bail!("--{name} must be at least 1 second");
        }
        Ok(Duration::from_secs(s))
    };
    if args.max_body_kb == 0
        || args.max_prompt_tokens == Some(0)
        || args.max_tokens == Some(0)
        || args.max_grammar_kb == 0
        || args.max_grammar_depth == 0
    {
        anyhow::bail!("--max-body-kb, --max-prompt-tokens, --max-tokens, --max-grammar-kb and --max-grammar-depth must be at least 1");
    }
    let limits = RequestLimits {
        max_body_bytes: args.max_body_kb.saturating_mul(1024),
        body_timeout: secs("body-timeout", args.body_timeout)?,
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens: args.max_tokens,
        grammar: hearth_engine::GrammarLimits {
            max_bytes: args.max_grammar_kb.saturating_mul(1024),
            max_depth: args.max_grammar_depth,
            timeout: secs("grammar-timeout", args.grammar_timeout)?,
        },
        completions_special_tokens: !args.no_completions_special_tokens,
    };
    let chain_key = match &args.audit_key_file {
        Some(p) => Some(hearth_server::audit::ChainKey::read(p)?),
        None => None,
    };
    let checkpoints = match &args.audit_signing_key {
        Some(p) => {
            if args.audit_checkpoint_every == 0 {
                anyhow::bail!("--audit-checkpoint-every must be at least 1");
            }
            Some(hearth_server::audit::Checkpoints {
                key: Arc::new(hearth_server::audit::SigningKey::read(p)?),
                every: args.audit_checkpoint_every,
            })
        }
        None => None,
    };
    let audit = match &args.audit_log {
        Some(path) => Some(
            AuditLog::open(AuditConfig {
                path: path.clone(),
                fsync: args.audit_fsync,
                max_bytes: args.audit_rotate_size,
                content: args.audit_content,
                chain_key,
                checkpoints,
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
    if args.max_connections == Some(0) {
        anyhow::bail!("--max-connections must be at least 1");
    }
    let fd_limit = hearth_server::raise_fd_limit();
    let max_connections = args
        .max_connections
        .unwrap_or_else(|| hearth_server::default_max_connections(fd_limit));
    if !hearth_server::connections_fit(max_connections, fd_limit) {
        tracing::warn!(
            max_connections,
            fd_limit,
            "--max-connections and its reserve of {} leave little room under the open-file limit: accepting may fail (raise `ulimit -n`)",
            hearth_server::RESERVE_CONNECTIONS
        );
    }
    tracing::info!(max_connections, "connection limit");
    let config = ServerConfig {
        addr: SocketAddr::new(args.host, args.port),
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
        tls,
        header_timeout: secs("header-timeout", args.header_timeout)?,
        max_connections,
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
    let audited = args.audit_log.is_some();
    let kv_dtype = args.model.kv_cache_dtype;
    let options = args.model.load_options()?;
    let pool = Arc::new(pool);
    std::thread::Builder::new()
        .name("hearth-loader".into())
        .spawn(move || {
            let result = (|| -> anyhow::Result<()> {
                crate::models::check_pin(&path, pin.as_deref(), require_pin)?;
                // Audit records name the file and its hash (read once; cached after).
                let sha256 = if audited {
                    crate::models::identity_sha256(&path)?
                } else {
                    None
                };
                loader_state.set_model_file(hearth_server::ModelFile {
                    name: path
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    sha256,
                });
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
