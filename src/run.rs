//! `hearth run`: one prompt in, the continuation streamed to stdout.

use std::io::{Read, Write};

use anyhow::Context;
use clap::Args;
use hearth_engine::SamplingParams;
use hearth_models::{ChatMessage, IncrementalDecoder};

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; `-` or nothing reads it from stdin.
    prompt: Option<String>,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Random seed (default: a fresh one each run).
    #[arg(long)]
    seed: Option<u64>,
    /// Print timings to stderr when done.
    #[arg(long)]
    stats: bool,
}

impl RunArgs {
    pub fn model_args(&self) -> &ModelArgs {
        &self.model
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let prompt = match args.prompt.as_deref() {
        Some("-") | None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the prompt from stdin")?;
            s
        }
        Some(p) => p.to_owned(),
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        penalty_last_n: args.repeat_last_n,
        penalize_prompt: true,
        logit_bias: Vec::new(),
        seed: args.seed.unwrap_or_else(fresh_seed),
    };
    params
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid sampling flag: {e}"))?;

    let model = args.model.load()?;
    let tokenizer = &model.info.tokenizer;
    let text = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::new("system", s.as_str()));
        }
        messages.push(ChatMessage::new("user", prompt.as_str()));
        model.info.chat_template.render(&messages, true)?
    } else {
        prompt
    };
    // A chat template writes its own BOS where it wants one.
    let tokens = tokenizer.encode(&text, !args.chat)?;
    if tokens.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let ctx = model.context_length();
    if tokens.len() >= ctx {
        anyhow::bail!(
            "the prompt is {} tokens long but the model's context is {ctx} tokens",
            tokens.len()
        );
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut decoder = IncrementalDecoder::default();
    let mut write_error = None;
    let stats = model.generate(&tokens, params, args.max_tokens, |tok| {
        // Control tokens are markup, not text (llama.cpp hides them too).
        if tokenizer.is_control(tok) {
            return true;
        }
        let piece = decoder.push(tokenizer.token_bytes(tok));
        match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = write_error {
        // A closed pipe (`| head`) is a normal way to stop reading.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
        return Ok(());
    }
    let tail = decoder.finish();
    let _ = out.write_all(tail.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    if args.stats {
        let tps = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s; generated: {} tokens, {:.1} tok/s; finish: {:?}",
            stats.prompt_tokens,
            tps(stats.prompt_tokens, stats.prompt_time),
            stats.generated_tokens,
            tps(stats.generated_tokens, stats.generation_time),
            stats.finish_reason
        );
    }
    Ok(())
}

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (std::process::id() as u64).rotate_left(32)
}
