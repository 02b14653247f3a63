//! `hearth keys` and `hearth audit`: the operator's side of access control. Keys are
//! written to the keys file as hashes; the key itself is printed once, on stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use hearth_server::keys::{KeysFile, Limits};

#[derive(Args, Debug)]
pub struct KeysArgs {
    /// The keys file (the server's --api-keys-file).
    #[arg(long, env = "HEARTH_API_KEYS_FILE", global = true)]
    api_keys_file: Option<PathBuf>,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key: its hash goes into the file, the key itself to stdout, once.
    Add {
        /// A name for the key (letters, digits, -_.@): it appears in the audit log.
        name: String,
        /// Served model names the key may use, comma-separated (default: any).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute (default: unlimited).
        #[arg(long)]
        rpm: Option<u32>,
        /// Prompt + completion tokens per minute (default: unlimited).
        #[arg(long)]
        tpm: Option<u64>,
        /// Requests at once (default: unlimited).
        #[arg(long)]
        concurrent: Option<u32>,
    },
    /// Show the keys: names, models, limits, status (never the keys).
    List,
    /// Revoke a key: it is refused after the server's next reload (SIGHUP).
    Revoke { name: String },
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain across audit log files (any order, rotated files included);
    /// report the first broken or missing line, and the requests that started and never
    /// finished.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Accept a chain that starts after the first line ever written (older files
        /// deleted on purpose).
        #[arg(long)]
        partial: bool,
        /// The chain key the server was given (--audit-key-file): checks every line's mac.
        /// A keyed log cannot be checked without it.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The checkpoint public key (`hearth audit keygen`): checks every checkpoint's
        /// signature, and the LOG.checkpoint sidecar's.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Make an Ed25519 key pair for signed checkpoints: PREFIX.key (private, mode 0600,
    /// for `hearth serve --audit-signing-key`) and PREFIX.pub (for verifiers).
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Also write a new chain key (for `hearth serve --audit-key-file`) to this file
        /// (mode 0600).
        #[arg(long)]
        chain_key: Option<PathBuf>,
    },
}

fn now() -> String {
    hearth_models::clock::rfc3339_seconds(std::time::SystemTime::now())
}

pub fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let path = args
        .api_keys_file
        .context("no keys file: give --api-keys-file PATH (or set HEARTH_API_KEYS_FILE)")?;
    match args.command {
        KeysCommand::Add {
            name,
            models,
            rpm,
            tpm,
            concurrent,
        } => {
            let mut file = KeysFile::read_or_empty(&path)?;
            let limits = Limits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                max_concurrent: concurrent,
            };
            let models = models
                .into_iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
            let key = file.add(&name, models, limits, &now())?;
            file.write(&path)?;
            println!("{key}");
            eprintln!(
                "hearth: key `{name}` added to {}; the key above is shown only now (the file keeps its hash). A running server takes it after SIGHUP.",
                path.display()
            );
        }
        KeysCommand::List => {
            let file = KeysFile::read(&path)?;
            println!(
                "{:<24} {:<24} {:>6} {:>9} {:>10}  {:<20} status",
                "name", "models", "rpm", "tpm", "concurrent", "created"
            );
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            for k in &file.keys {
                let status = match &k.revoked {
                    Some(t) => format!("revoked {t}"),
                    None => "active".into(),
                };
                println!(
                    "{:<24} {:<24} {:>6} {:>9} {:>10}  {:<20} {status}",
                    k.name,
                    k.models.join(","),
                    or_dash(k.requests_per_minute.map(|v| v.to_string())),
                    or_dash(k.tokens_per_minute.map(|v| v.to_string())),
                    or_dash(k.max_concurrent.map(|v| v.to_string())),
                    or_dash(k.created.clone()),
                );
            }
        }
        KeysCommand::Revoke { name } => {
            let mut file = KeysFile::read(&path)?;
            file.revoke(&name, &now())?;
            file.write(&path)?;
            eprintln!(
                "hearth: key `{name}` revoked in {}; a running server refuses it after SIGHUP.",
                path.display()
            );
        }
    }
    Ok(())
}

pub fn audit(args: AuditArgs) -> anyhow::Result<()> {
    use hearth_server::audit::{self, ChainKey, Check, PublicKey, SigningKey};
    match args.command {
        AuditCommand::Verify {
            files,
            partial,
            key_file,
            public_key,
        } => {
            let key = key_file.as_deref().map(ChainKey::read).transpose()?;
            let public_key = public_key.as_deref().map(PublicKey::read).transpose()?;
            let check = Check {
                partial,
                key: key.as_ref(),
                public_key: public_key.as_ref(),
            };
            let v = audit::verify_with(&files, check)
                .map_err(|b| anyhow::anyhow!("audit chain broken at {b}"))?;
            let seqs = match v.last_seq {
                Some(last) => format!("seq {} to {last}", v.first_seq),
                None => "no lines".into(),
            };
            println!(
                "ok: {} lines in {} file(s), {seqs}, unbroken; head {}",
                v.lines,
                v.files.len(),
                v.head
            );
            if let Some(from) = v.keyed_from {
                println!(
                    "keyed: {} from seq {from}, every mac checked",
                    ChainKey::SCHEME
                );
            }
            match &v.last_checkpoint {
                Some((seq, time)) => println!(
                    "checkpoints: {}, signatures {}; the last at seq {seq} ({time})",
                    v.checkpoints,
                    if v.signed {
                        "checked"
                    } else {
                        "NOT checked (give --public-key)"
                    }
                ),
                None => println!("checkpoints: none"),
            }
            match &v.sidecar {
                Some((path, s)) => println!(
                    "sidecar {}: the log holds its checkpoint at seq {}",
                    path.display(),
                    s.seq
                ),
                None if v.checkpoints > 0 => println!(
                    "sidecar: none found; lines cut after the last checkpoint cannot be told from a whole log"
                ),
                None => {}
            }
            if !v.unfinished.is_empty() {
                println!(
                    "warning: {} request(s) started and never finished (the server died, or is still serving them):",
                    v.unfinished.len()
                );
                for u in &v.unfinished {
                    println!("  {} seq {} {} {}", u.id, u.seq, u.time, u.endpoint);
                }
            }
        }
        AuditCommand::Keygen { out, chain_key } => {
            if let Some(p) = &chain_key {
                write_new_private(p, &ChainKey::generate()?)?;
            }
            let (private, public) = SigningKey::generate(&out)?;
            eprintln!(
                "hearth: wrote {} (private: give it to `hearth serve --audit-signing-key`) and {} (public: for `hearth audit verify --public-key`)",
                private.display(),
                public.display()
            );
            if let Some(p) = &chain_key {
                eprintln!(
                    "hearth: wrote {} (secret chain key: `hearth serve --audit-key-file`, `hearth audit verify --key-file`)",
                    p.display()
                );
            }
        }
    }
    Ok(())
}

/// Writes a new file (never overwriting) that only its owner may read.
fn write_new_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}
