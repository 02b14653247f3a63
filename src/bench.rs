//! `hearth bench`: llama-bench's pp/tg tests on our engine, mean ± sd over repetitions.

use std::time::Instant;

use clap::{Args, ValueEnum};
use hearth_engine::sampler::Rng;
use hearth_engine::{BatchItem, BlockTable};

use crate::ModelArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Md,
    Json,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens processed in one batch (ppN); 0 skips the test.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens generated one at a time (tgN); 0 skips the test.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Also measure batched generation: this many sequences decoding together, one
    /// token each per step (reported as aggregate tokens/s); 0 skips the test.
    #[arg(short = 'b', long = "batch", default_value_t = 0)]
    batch: usize,
    /// Tokens already in the context when the pp and tg tests run (llama-bench's `-d`):
    /// prefilled before each repetition, untimed. Batched generation starts empty.
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    depth: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Md)]
    output: Output,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Load-test a running server (this one or any OpenAI-compatible one) at several
    /// concurrency levels.
    Serve(crate::loadgen::ServeBenchArgs),
}

struct Sample {
    test: String,
    tokens_per_s: Vec<f64>,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

impl BenchArgs {
    pub fn model_args(&self) -> &ModelArgs {
        &self.model
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        anyhow::bail!("--repetitions must be at least 1");
    }
    let model = args.model.load()?;
    let ctx = model.context_length();
    if args.n_prompt + args.n_gen >= ctx || args.depth + args.n_prompt.max(args.n_gen) >= ctx {
        anyhow::bail!(
            "-d {}, -p {} and -n {} do not fit the model's context of {ctx} tokens",
            args.depth,
            args.n_prompt,
            args.n_gen
        );
    }
    let vocab = model.info.tokenizer.vocab_size() as u64;
    let mut rng = Rng::new(42);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };

    // One block pool for every test; each repetition gives its blocks back.
    let mut cache = model.model.cache_for_sequences(args.batch.max(1))?;
    let mut samples = Vec::new();
    // The context each pp/tg repetition starts from, and what its test is called.
    let context = random_tokens(args.depth);
    let at_depth = |test: String| {
        if args.depth > 0 {
            format!("{test} @ d{}", args.depth)
        } else {
            test
        }
    };
    if args.n_prompt > 0 {
        let tokens = random_tokens(args.n_prompt);
        // One warm-up pass, as llama-bench does.
        let mut table = BlockTable::new();
        model.prefill(&mut cache, &mut table, &context)?;
        model.prefill(&mut cache, &mut table, &tokens)?;
        cache.release(&mut table);
        let mut tps = Vec::new();
        for _ in 0..args.repetitions {
            model.prefill(&mut cache, &mut table, &context)?;
            let t = Instant::now();
            model.prefill(&mut cache, &mut table, &tokens)?;
            tps.push(args.n_prompt as f64 / t.elapsed().as_secs_f64());
            cache.release(&mut table);
        }
        samples.push(Sample {
            test: at_depth(format!("pp{}", args.n_prompt)),
            tokens_per_s: tps,
        });
    }
    if args.n_gen > 0 {
        let tokens = random_tokens(args.n_gen);
        let mut table = BlockTable::new();
        model.model.forward(&mut cache, &mut table, &tokens[..1])?;
        cache.release(&mut table);
        let mut tps = Vec::new();
        for _ in 0..args.repetitions {
            model.prefill(&mut cache, &mut table, &context)?;
            let t = Instant::now();
            for tok in &tokens {
                let one = std::slice::from_ref(tok);
                model.model.forward(&mut cache, &mut table, one)?;
            }
            tps.push(args.n_gen as f64 / t.elapsed().as_secs_f64());
            cache.release(&mut table);
        }
        samples.push(Sample {
            test: at_depth(format!("tg{}", args.n_gen)),
            tokens_per_s: tps,
        });
    }

    if args.batch > 0 && args.n_gen > 0 {
        let steps: Vec<Vec<u32>> = (0..args.n_gen).map(|_| random_tokens(args.batch)).collect();
        let mut tps = Vec::new();
        for _ in 0..args.repetitions {
            let mut tables: Vec<_> = (0..args.batch).map(|_| BlockTable::new()).collect();
            let t = Instant::now();
            for step in &steps {
                let mut items: Vec<BatchItem> = step
                    .iter()
                    .zip(tables.iter_mut())
                    .map(|(tok, table)| BatchItem {
                        tokens: std::slice::from_ref(tok),
                        table,
                    })
                    .collect();
                model.model.forward_batch(&mut cache, &mut items)?;
            }
            tps.push((args.n_gen * args.batch) as f64 / t.elapsed().as_secs_f64());
            for table in &mut tables {
                cache.release(table);
            }
        }
        samples.push(Sample {
            test: format!("tg{} b{}", args.n_gen, args.batch),
            tokens_per_s: tps,
        });
    }

    let info = &model.info;
    let name = info
        .config
        .name
        .clone()
        .unwrap_or_else(|| info.config.architecture.name().to_owned());
    let stored = info
        .weights
        .tensors()
        .get("blk.0.attn_q.weight")
        .map_or("?".to_owned(), |t| t.dtype.to_string());
    // Weights converted at load run as their new type.
    let quant = match args.model.quantize.or(args.model.dtype) {
        Some(to) => format!("{stored}→{to}"),
        None => stored,
    };
    let size_mib = info.weights.total_bytes() as f64 / (1024.0 * 1024.0);
    let params_m = info.weights.parameter_count() as f64 / 1e6;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let backend = if model.model.device().is_cpu() {
        "CPU"
    } else {
        "GPU"
    };
    match args.output {
        Output::Md => {
            println!("| model | size | params | backend | threads | test | t/s |");
            println!("| ----- | ---: | -----: | ------- | ------: | ---: | --: |");
            for s in &samples {
                let (m, sd) = mean_sd(&s.tokens_per_s);
                println!(
                    "| {name} {quant} | {size_mib:.2} MiB | {params_m:.2} M | {backend} | {threads} | {} | {m:.2} ± {sd:.2} |",
                    s.test
                );
            }
        }
        Output::Json => {
            for s in &samples {
                let (m, sd) = mean_sd(&s.tokens_per_s);
                let runs: Vec<String> = s.tokens_per_s.iter().map(|x| format!("{x:.3}")).collect();
                println!(
                    "{{\"model\":{name:?},\"quant\":\"{quant}\",\"threads\":{threads},\"test\":\"{}\",\"mean_tps\":{m:.3},\"sd_tps\":{sd:.3},\"runs\":[{}]}}",
                    s.test,
                    runs.join(",")
                );
            }
        }
    }
    Ok(())
}
