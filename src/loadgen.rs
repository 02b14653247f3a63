//! `hearth bench serve`: a load generator for any OpenAI-compatible server. For each
//! concurrency level it keeps that many streaming chat requests in flight until
//! `--requests` have finished, and reports aggregate generated tokens/s, time to first
//! token and inter-token latency percentiles, and errors.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};

use crate::bench::Output;
use crate::http_client;

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrency levels to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Requests per level (default: four per concurrent stream, at least 8).
    #[arg(long)]
    requests: Option<usize>,
    /// Tokens each request generates (`max_tokens`, with `ignore_eos` so that every
    /// request generates exactly this many).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// The `model` field to send (default: the first model the server lists).
    #[arg(long)]
    model: Option<String>,
    /// JSON object merged into every request body, e.g. a `response_format` or `tools`
    /// to measure what constrained decoding costs.
    #[arg(long, value_parser = parse_extra)]
    extra: Option<Value>,
    /// Bearer key, when the server wants one.
    #[arg(long, env = "HEARTH_API_KEY")]
    api_key: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Md)]
    output: Output,
}

fn parse_extra(s: &str) -> Result<Value, String> {
    match serde_json::from_str(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

#[derive(Default)]
struct Outcome {
    /// Seconds from sending to the first content.
    ttft: Vec<f64>,
    /// Seconds between consecutive content chunks.
    itl: Vec<f64>,
    tokens: usize,
    errors: usize,
    first_error: Option<String>,
}

struct Level {
    concurrency: usize,
    requests: usize,
    wall: f64,
    outcome: Outcome,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

/// Prompts of different lengths, so that sequences in a batch are unequal.
fn prompt(i: usize) -> String {
    let topics = [
        "the history of the hearth",
        "how bread is baked",
        "why the sky is blue",
        "the life of a lighthouse keeper",
        "a walk through an old forest",
    ];
    let extra = " Give many details.".repeat(i % 4);
    format!(
        "Request {i}. Write a long story about {}.{extra}",
        topics[i % topics.len()]
    )
}

/// One streaming request; records its latencies into `out`.
fn one_request(
    args: &ServeBenchArgs,
    authority: &str,
    model: &str,
    i: usize,
) -> anyhow::Result<(Vec<f64>, f64, usize)> {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(Value::Object(extra)) = &args.extra {
        for (k, v) in extra {
            body[k] = v.clone();
        }
    }
    let body = body.to_string();
    let auth = args.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let start = Instant::now();
    let res = http_client::send(
        authority,
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(body.as_bytes()),
        Duration::from_secs(600),
    )?;
    if res.status != 200 {
        let status = res.status;
        anyhow::bail!("HTTP {status}: {}", res.text().unwrap_or_default());
    }
    let mut events = res.events();
    let mut ttft = None;
    let mut last = start;
    let mut itl = Vec::new();
    let mut tokens = 0;
    let mut chunks = 0;
    while let Some(data) = events.next_data()? {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).context("a chunk is not JSON")?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("stream error: {e}");
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        let has_content = v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty());
        if has_content {
            chunks += 1;
            let now = Instant::now();
            match ttft {
                None => ttft = Some((now - start).as_secs_f64()),
                Some(_) => itl.push((now - last).as_secs_f64()),
            }
            last = now;
        }
    }
    let ttft = ttft.ok_or_else(|| anyhow::anyhow!("no content was streamed"))?;
    // Servers that send no usage: count content chunks (one token each, mostly).
    Ok((itl, ttft, if tokens > 0 { tokens } else { chunks }))
}

fn run_level(args: &ServeBenchArgs, authority: &str, model: &str, concurrency: usize) -> Level {
    let requests = args.requests.unwrap_or((concurrency * 4).max(8));
    let next = AtomicUsize::new(0);
    let outcome = Mutex::new(Outcome::default());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= requests {
                    break;
                }
                let r = one_request(args, authority, model, i);
                let mut o = outcome.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok((itl, ttft, tokens)) => {
                        o.ttft.push(ttft);
                        o.itl.extend(itl);
                        o.tokens += tokens;
                    }
                    Err(e) => {
                        o.errors += 1;
                        o.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            });
        }
    });
    Level {
        concurrency,
        requests,
        wall: start.elapsed().as_secs_f64(),
        outcome: outcome.into_inner().unwrap_or_else(|e| e.into_inner()),
    }
}

fn first_model(authority: &str, key: Option<&str>) -> anyhow::Result<String> {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let res = http_client::send(
        authority,
        "GET",
        "/v1/models",
        &headers,
        None,
        Duration::from_secs(30),
    )?;
    let status = res.status;
    let v: Value = serde_json::from_str(&res.text()?)?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("GET /v1/models gave HTTP {status} and no model: {v}"))
}

pub fn bench_serve(args: ServeBenchArgs) -> anyhow::Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        anyhow::bail!("--concurrency needs levels of at least 1");
    }
    if args.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let authority = http_client::authority(&args.url)?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&authority, args.api_key.as_deref())
            .with_context(|| format!("cannot reach {}", args.url))?,
    };
    // One warm-up request, not counted.
    one_request(&args, &authority, &model, 0).context("the warm-up request failed")?;
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let level = run_level(&args, &authority, &model, c);
        if let Some(e) = &level.outcome.first_error {
            eprintln!(
                "concurrency {c}: {} errors; first: {e}",
                level.outcome.errors
            );
        }
        levels.push(level);
    }
    let base = levels
        .first()
        .map(|l| l.outcome.tokens as f64 / l.wall)
        .unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    for l in &mut levels {
        let o = &mut l.outcome;
        let tps = o.tokens as f64 / l.wall;
        rows.push(json!({
            "concurrency": l.concurrency,
            "requests": l.requests,
            "errors": o.errors,
            "generated_tokens": o.tokens,
            "wall_s": l.wall,
            "tokens_per_s": tps,
            "vs_first_level": tps / base,
            "ttft_p50_ms": percentile(&mut o.ttft, 50.0) * 1e3,
            "ttft_p95_ms": percentile(&mut o.ttft, 95.0) * 1e3,
            "itl_p50_ms": percentile(&mut o.itl, 50.0) * 1e3,
            "itl_p95_ms": percentile(&mut o.itl, 95.0) * 1e3,
        }));
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Md => {
            println!(
                "model {model} at {}, max_tokens {}\n",
                args.url, args.max_tokens
            );
            println!("| concurrency | requests | errors | gen t/s | × first | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |");
            println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            for r in &rows {
                println!(
                    "| {} | {} | {} | {:.1} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} |",
                    r["concurrency"],
                    r["requests"],
                    r["errors"],
                    r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                    r["vs_first_level"].as_f64().unwrap_or(f64::NAN),
                    r["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN),
                    r["ttft_p95_ms"].as_f64().unwrap_or(f64::NAN),
                    r["itl_p50_ms"].as_f64().unwrap_or(f64::NAN),
                    r["itl_p95_ms"].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
    }
    if levels.iter().any(|l| l.outcome.errors > 0) {
        anyhow::bail!("some requests failed (see above)");
    }
    Ok(())
}
