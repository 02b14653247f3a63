//! `hearth models verify|bom`, and the pin check every command that loads a model makes:
//! the file's sha256 against `--sha256` or its manifest, with a progress bar for big files.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use hearth_models::locate::{self, ManifestEntry};
use hearth_models::pin::{self, HashCache, Hashed, PinError};

#[derive(Args, Debug)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Rehash model files and compare them with their pins (every model of
    /// models/manifest.toml on disk, or those given with -m); exit 1 on any mismatch or
    /// unpinned file.
    Verify {
        /// A model file or manifest name (repeatable; default: every manifest model).
        #[arg(short = 'm', long = "model")]
        models: Vec<String>,
        /// The expected sha256 of the single model given with -m.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Write a CycloneDX 1.6 bill of materials (ML-BOM) of the models: names,
    /// architectures, parameters, quantization, files with hashes, licenses, origins.
    Bom {
        /// A model file or manifest name (repeatable; default: every manifest model on disk).
        #[arg(short = 'm', long = "model")]
        models: Vec<String>,
        /// The expected sha256 of the single model given with -m.
        #[arg(long)]
        sha256: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

/// Progress on stderr while hashing a big file, when stderr is a terminal (a bar);
/// otherwise silent, so errors stay one line (the log at info level records each check).
pub fn progress(path: &Path) -> impl FnMut(u64, u64) {
    let tty = std::io::stderr().is_terminal();
    let name = path.display().to_string();
    let start = Instant::now();
    let mut shown = None;
    move |done: u64, total: u64| {
        if !tty || total < 64 << 20 {
            return;
        }
        let pct = done * 100 / total.max(1);
        if shown == Some(pct) {
            return;
        }
        shown = Some(pct);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut err = std::io::stderr().lock();
        let filled = (pct / 4) as usize;
        let _ = write!(
            err,
            "\rhearth: sha256 {name} [{}{}] {pct:3}% {:.0}/{:.0} MiB",
            "#".repeat(filled),
            " ".repeat(25 - filled),
            mib(done),
            mib(total)
        );
        if done == total {
            let _ = writeln!(err, " {:.1} s", start.elapsed().as_secs_f64());
        }
    }
}

/// Checks `path` against its pin before it is loaded (the hash cache makes unchanged files
/// fast). Unpinned files load (noted in the log at info level), or are refused with
/// `require`.
pub fn check_pin(path: &Path, explicit: Option<&str>, require: bool) -> anyhow::Result<()> {
    if path.is_dir() {
        return check_folder_pins(path, explicit, require);
    }
    let Some(p) = pin::find_pin(path, explicit)? else {
        if require {
            anyhow::bail!(
                "{}: no pin (no --sha256, and no manifest.toml entry for it in models/ or beside it); --require-pin refuses unpinned models",
                path.display()
            );
        }
        tracing::info!(path = %path.display(), "the model file is not pinned by any sha256");
        return Ok(());
    };
    let cache = HashCache::default_location();
    let start = Instant::now();
    let how = pin::verify(path, &p, cache.as_ref(), &mut progress(path))?;
    tracing::info!(
        path = %path.display(),
        sha256 = %p.sha256,
        from = %p.from,
        cached = how == Hashed::Cached,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "model file verified"
    );
    Ok(())
}

/// The hash that names a model in audit records: the file's SHA-256, or for a folder,
/// that of its `manifest.toml` (which pins every file; `None` without one).
pub fn identity_sha256(path: &Path) -> anyhow::Result<Option<String>> {
    let file = if path.is_dir() {
        let manifest = path.join(locate::MANIFEST);
        if !manifest.is_file() {
            return Ok(None);
        }
        manifest
    } else {
        path.to_path_buf()
    };
    let cache = HashCache::default_location();
    let (sha, _) = pin::hash_with_cache(&file, cache.as_ref(), true, &mut progress(&file))?;
    Ok(Some(sha))
}

/// A model folder is pinned file by file by a `manifest.toml` inside it (one entry per
/// file: weights, tokenizer, config); every file it lists must match.
fn check_folder_pins(dir: &Path, explicit: Option<&str>, require: bool) -> anyhow::Result<()> {
    if explicit.is_some() {
        anyhow::bail!(
            "{}: --sha256 pins one file; pin a model folder by listing its files in {}/manifest.toml",
            dir.display(),
            dir.display()
        );
    }
    if !dir.join(locate::MANIFEST).is_file() {
        if require {
            anyhow::bail!(
                "{}: no manifest.toml in the folder pins its files; --require-pin refuses unpinned models",
                dir.display()
            );
        }
        tracing::info!(path = %dir.display(), "the model folder is not pinned by a manifest.toml");
        return Ok(());
    }
    let manifest = locate::read_manifest(dir)?;
    let cache = HashCache::default_location();
    for e in &manifest.entries {
        let file = manifest.path_of(e);
        let p = pin::Pin {
            sha256: e.sha256.clone(),
            from: format!("{} (`{}`)", dir.join(locate::MANIFEST).display(), e.name),
        };
        pin::verify(&file, &p, cache.as_ref(), &mut progress(&file))?;
    }
    tracing::info!(path = %dir.display(), files = manifest.entries.len(), "model folder verified");
    Ok(())
}

/// The models a command is about: those given with -m, else every manifest entry.
fn selected(
    models: &[String],
    sha256: Option<&str>,
) -> anyhow::Result<Vec<(String, PathBuf, Option<ManifestEntry>)>> {
    if sha256.is_some() && models.len() != 1 {
        anyhow::bail!("--sha256 pins one model file: give exactly one -m");
    }
    let manifest = match locate::models_dir() {
        Some(dir) => Some(locate::read_manifest(&dir)?),
        None => None,
    };
    let entry_for = |path: &Path| manifest.as_ref()?.entry_for(path).cloned();
    if models.is_empty() {
        let m = manifest
            .as_ref()
            .context("no -m given and no models/manifest.toml found")?;
        return Ok(m
            .entries
            .iter()
            .map(|e| (e.name.clone(), m.path_of(e), Some(e.clone())))
            .collect());
    }
    let mut out = Vec::new();
    for arg in models {
        let path = locate::resolve_model(Some(arg))?;
        let entry = entry_for(&path);
        let name = entry.as_ref().map_or_else(
            || {
                path.file_stem()
                    .map_or("model".into(), |s| s.to_string_lossy().into_owned())
            },
            |e| e.name.clone(),
        );
        out.push((name, path, entry));
    }
    Ok(out)
}

pub fn models(args: ModelsArgs) -> anyhow::Result<()> {
    match args.command {
        ModelsCommand::Verify { models, sha256 } => verify(&models, sha256.as_deref()),
        ModelsCommand::Bom {
            models,
            sha256,
            output,
        } => bom(&models, sha256.as_deref(), output.as_deref()),
    }
}

fn verify(models: &[String], sha256: Option<&str>) -> anyhow::Result<()> {
    let cache = HashCache::default_location();
    let (mut good, mut bad, mut absent) = (0, 0, 0);
    for (name, path, _) in selected(models, sha256)? {
        let shown = path.display();
        if path.is_dir() {
            // A folder: each file its manifest.toml lists, reread.
            let manifest = path.join(locate::MANIFEST);
            if !manifest.is_file() {
                bad += 1;
                println!(
                    "UNPINNED  {name}  {shown}  (no manifest.toml in the folder lists its files)"
                );
                continue;
            }
            let m = locate::read_manifest(&path)?;
            for e in &m.entries {
                let file = m.path_of(e);
                match pin::hash_with_cache(&file, cache.as_ref(), false, &mut progress(&file)) {
                    Ok((actual, _)) if actual == e.sha256 => {
                        good += 1;
                        println!("OK        {name}  {}  sha256 {actual}", file.display());
                    }
                    Ok((actual, _)) => {
                        bad += 1;
                        println!(
                            "MISMATCH  {name}  {}  file sha256 {actual}, pinned {} by {}",
                            file.display(),
                            e.sha256,
                            manifest.display()
                        );
                    }
                    Err(err) => {
                        bad += 1;
                        println!("ERROR     {name}  {err}");
                    }
                }
            }
            continue;
        }
        if !path.is_file() {
            println!("ABSENT    {name}  {shown}");
            absent += 1;
            continue;
        }
        let start = Instant::now();
        let result = pin::find_pin(&path, sha256).and_then(|p| {
            // Always read whole: on demand, the cache is not trusted (it is refreshed).
            let (actual, _) =
                pin::hash_with_cache(&path, cache.as_ref(), false, &mut progress(&path))?;
            Ok((p, actual))
        });
        match result {
            Ok((Some(p), actual)) if actual == p.sha256 => {
                good += 1;
                println!(
                    "OK        {name}  {shown}  sha256 {actual}  ({}, {:.1} s)",
                    p.from,
                    start.elapsed().as_secs_f64()
                );
            }
            Ok((Some(p), actual)) => {
                bad += 1;
                println!(
                    "MISMATCH  {name}  {shown}  file sha256 {actual}, pinned {} by {}",
                    p.sha256, p.from
                );
            }
            Ok((None, actual)) => {
                bad += 1;
                println!(
                    "UNPINNED  {name}  {shown}  sha256 {actual} (no --sha256 or manifest entry)"
                );
            }
            Err(e) => {
                bad += 1;
                println!("ERROR     {name}  {e}");
            }
        }
    }
    eprintln!("hearth: {good} verified, {bad} failed, {absent} not on disk");
    if bad > 0 {
        anyhow::bail!("{bad} model file(s) failed verification");
    }
    Ok(())
}

/// Every regular file of a folder (relative paths, sorted), hidden files left out.
fn folder_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))
            .with_context(|| format!("cannot read {}", dir.join(&rel).display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(rel.join(&name));
            } else if ty.is_file() {
                out.push(rel.join(&name));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn bom(models: &[String], sha256: Option<&str>, output: Option<&Path>) -> anyhow::Result<()> {
    let cache = HashCache::default_location();
    let mut described = Vec::new();
    for (name, path, manifest) in selected(models, sha256)? {
        if !path.exists() {
            eprintln!(
                "hearth: {name}: {} is not on disk; left out",
                path.display()
            );
            continue;
        }
        let (files, pinned_by) = if path.is_dir() {
            // A folder: its pins (if any) checked first, then every file hashed.
            check_pin(&path, sha256, false)?;
            let pinned = path
                .join(locate::MANIFEST)
                .is_file()
                .then(|| path.join(locate::MANIFEST).display().to_string());
            let mut files = Vec::new();
            for rel in folder_files(&path)? {
                let full = path.join(&rel);
                let (sha, _) =
                    pin::hash_with_cache(&full, cache.as_ref(), true, &mut progress(&full))?;
                files.push((rel, sha));
            }
            (files, pinned)
        } else {
            let pin = pin::find_pin(&path, sha256)?;
            let (actual, _) =
                pin::hash_with_cache(&path, cache.as_ref(), true, &mut progress(&path))?;
            if let Some(p) = &pin {
                if p.sha256 != actual {
                    return Err(PinError::Mismatch {
                        path,
                        expected: p.sha256.clone(),
                        actual,
                        from: p.from.clone(),
                    }
                    .into());
                }
            }
            let file_name = PathBuf::from(path.file_name().unwrap_or_default());
            (vec![(file_name, actual)], pin.map(|p| p.from))
        };
        described.push(hearth_models::bom::BomModel {
            name,
            path,
            files,
            pinned_by,
            manifest,
        });
    }
    if described.is_empty() {
        anyhow::bail!("no model files to describe");
    }
    let doc = hearth_models::bom::cyclonedx(
        &described,
        env!("CARGO_PKG_VERSION"),
        std::time::SystemTime::now(),
    )?;
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    match output {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => print!("{text}"),
    }
    Ok(())
}
