//! How far a model's next-token distributions are from a reference's over a text, in
//! llama-perplexity's `--kl-divergence` terms: mean and 99th-percentile KL divergence,
//! how often the top token agrees, and each side's perplexity. For the arithmetic of our
//! quantized kernels: the reference is the same weights dequantized to f32 (llama.cpp's
//! quantizer writes that file) with an f32 KV cache, the tested model the quantized file
//! in each `--arithmetic`.
//!
//! ```sh
//! scripts/requantize-default-model /tmp/rq        # also writes the F32 file
//! cargo run --release -p hearth-engine --example kl_divergence -- \
//!   /tmp/rq/SmolLM2-135M-Instruct.F32.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!   /usr/share/common-licenses/GFDL-1.3 1024
//! ```
//!
//! Every position is a decode step (one token a call), as generation runs.
use std::sync::Arc;

use hearth_engine::sampler::{argmax, log_softmax};
use hearth_engine::{Arithmetic, KvDtype, LoadOptions, LoadedModel};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [reference, tested, text, rest @ ..] = &args[..] else {
        eprintln!("usage: kl_divergence REFERENCE.gguf TESTED.gguf TEXT_FILE [TOKENS]");
        std::process::exit(2);
    };
    let n: usize = match rest.first().map(|s| s.parse()) {
        None => 1024,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => fail(format_args!(
            "TOKENS: {:?} is not a positive number",
            rest[0]
        )),
    };
    let text = std::fs::read_to_string(text).unwrap_or_else(|e| fail(format_args!("{text}: {e}")));
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    );
    pool.install(|| {
        let load = |path: &str, arithmetic: Arithmetic, kv: KvDtype| {
            let options = LoadOptions {
                arithmetic,
                ..LoadOptions::default()
            };
            let mut m = LoadedModel::load_with(path, &candle_core::Device::Cpu, options)
                .unwrap_or_else(|e| fail(format_args!("{e}")));
            m.model.set_kv_dtype(kv);
            m
        };
        let base = load(reference, Arithmetic::Lanes, KvDtype::F32);
        let tokens = base
            .info
            .tokenizer
            .encode(&text, false)
            .unwrap_or_else(|e| fail(format_args!("{}: {e}", args[2])));
        if tokens.len() <= n {
            fail(format_args!("{}: {} tokens, {n} asked", args[2], tokens.len()));
        }
        let tokens = &tokens[..n + 1];
        let reference = log_probs(&base, tokens);
        drop(base);
        println!(
            "{n} positions; reference {}: perplexity {:.4}",
            args[0],
            perplexity(&reference, tokens)
        );
        println!("| tested | arithmetic | KV cache | perplexity | mean KLD | 99% KLD | max KLD | same top token |");
        println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
        for (arithmetic, name) in [(Arithmetic::Lanes, "lanes"), (Arithmetic::Blocks, "blocks")] {
            for (kv, kv_name) in [(KvDtype::F16, "f16"), (KvDtype::F32, "f32")] {
                let model = load(tested, arithmetic, kv);
                let lp = log_probs(&model, tokens);
                let mut kld: Vec<f64> = reference
                    .iter()
                    .zip(&lp)
                    .map(|(p, q)| {
                        p.iter()
                            .zip(q)
                            .map(|(&p, &q)| (p as f64).exp() * (p as f64 - q as f64))
                            .sum()
                    })
                    .collect();
                let same = reference
                    .iter()
                    .zip(&lp)
                    .filter(|(p, q)| argmax(p) == argmax(q))
                    .count();
                let mean = kld.iter().sum::<f64>() / kld.len() as f64;
                kld.sort_by(f64::total_cmp);
                let p99 = kld[(kld.len() * 99 / 100).min(kld.len() - 1)];
                println!(
                    "| {tested} | {name} | {kv_name} | {:.4} | {mean:.6} | {p99:.5} | {:.4} | {:.2}% |",
                    perplexity(&lp, tokens),
                    kld[kld.len() - 1],
                    100.0 * same as f64 / lp.len() as f64,
                );
            }
        }
    });
}

/// Prints `message` as the error it is and exits with status 1.
fn fail(message: std::fmt::Arguments<'_>) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// The log-softmax of the logits after each of `tokens[..n]`, one decode step each.
fn log_probs(model: &LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.model.cache_for_sequences(1).unwrap();
    let mut table = hearth_engine::BlockTable::new();
    tokens[..tokens.len() - 1]
        .iter()
        .map(|&t| log_softmax(&model.model.forward(&mut cache, &mut table, &[t]).unwrap()))
        .collect()
}

/// exp of the mean negative log-likelihood of each next token.
fn perplexity(log_probs: &[Vec<f32>], tokens: &[u32]) -> f64 {
    let nll: f64 = log_probs
        .iter()
        .zip(&tokens[1..])
        .map(|(lp, &t)| -(lp[t as usize] as f64))
        .sum();
    (nll / log_probs.len() as f64).exp()
}
