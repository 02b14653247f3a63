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
    /// report the first broken or missing line.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Accept a chain that starts after the first line ever written (older files
        /// deleted on purpose).
        #[arg(long)]
        partial: bool,
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
    match args.command {
        AuditCommand::Verify { files, partial } => {
            let v = hearth_server::audit::verify(&files, partial)
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
        }
    }
    Ok(())
}
