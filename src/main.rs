//! `hearth`: the command line. Parses flags into typed configs and hands them to the
//! library crates; errors become one line on stderr and a non-zero exit.

mod admin;
mod bench;
mod http_client;
mod loadgen;
mod models;
mod run;
mod serve;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hearth",
    version,
    about = "A local inference server for open-weight language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of a prompt and stream it to stdout.
    Run(run::RunArgs),
    /// Measure prompt processing and generation speed (llama-bench style), or load-test
    /// a server (`hearth bench serve`).
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Manage the API keys file: add, list, revoke.
    Keys(admin::KeysArgs),
    /// Check the audit log's hash chain.
    Audit(admin::AuditArgs),
    /// Verify model files against their pinned hashes; write a bill of materials.
    Models(models::ModelsArgs),
}

/// Flags shared by every command that loads a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face model folder, `org/name[@revision]` from the local
    /// Hugging Face cache, or a name from models/manifest.toml. Default: the default model.
    #[arg(short = 'm', long = "model", env = "HEARTH_MODEL")]
    pub model: Option<String>,
    /// The model file's expected sha256: a mismatch refuses to load it. Without it, the
    /// pin comes from models/manifest.toml or a manifest.toml beside the file.
    #[arg(long, env = "HEARTH_MODEL_SHA256")]
    pub sha256: Option<String>,
    /// Refuse a model file that no --sha256 or manifest pins.
    #[arg(long)]
    pub require_pin: bool,
    /// What the KV cache stores on the CPU: f16 (half the memory, llama.cpp's numerics)
    /// or f32 (full precision, e.g. for f32 models checked against transformers).
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: hearth_engine::KvDtype,
    /// Quantize f32/f16/bf16 weight matrices at load: q8_0, q4_0, q4_1, q5_0, q5_1,
    /// q2_k … q6_k (our CPU kernels run all of them but q2_k and q3_k).
    #[arg(long, conflicts_with = "dtype")]
    pub quantize: Option<hearth_models::GgmlType>,
    /// Store f32/f16/bf16 weight matrices as this float type at load: f32, f16, bf16.
    #[arg(long)]
    pub dtype: Option<hearth_models::GgmlType>,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu", env = "HEARTH_DEVICE")]
    pub device: String,
    /// How the CPU kernels sum quantized dot products: `lanes`, llama.cpp's x86
    /// arithmetic (logits equal llama.cpp's to the bit), or `blocks`, one exact integer
    /// sum per block (faster, most for batches and prompts; uses Intel AMX where
    /// present; logits differ from llama.cpp's within quantization noise).
    #[arg(long, default_value = "lanes", env = "HEARTH_ARITHMETIC")]
    pub arithmetic: hearth_engine::Arithmetic,
    /// Compute threads (default: the cores this process may use).
    #[arg(short = 't', long, env = "HEARTH_THREADS")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// How weights are converted at load, from --quantize / --dtype.
    pub fn load_options(&self) -> anyhow::Result<hearth_engine::LoadOptions> {
        use hearth_models::GgmlType::{BF16, F16, F32};
        let convert = match (self.quantize, self.dtype) {
            (Some(q), _) if matches!(q, F32 | F16 | BF16) => {
                anyhow::bail!("--quantize {q} is a float type: use --dtype")
            }
            (_, Some(d)) if !matches!(d, F32 | F16 | BF16) => {
                anyhow::bail!("--dtype {d} is not a float type (f32, f16, bf16): use --quantize")
            }
            (q, d) => q.or(d),
        };
        Ok(hearth_engine::LoadOptions {
            convert,
            arithmetic: self.arithmetic,
        })
    }

    /// Compute threads: `--threads`, else the cores this process may use.
    fn threads(&self) -> anyhow::Result<usize> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        Ok(threads)
    }

    /// Resolves the model path and loads it.
    pub fn load(&self) -> anyhow::Result<hearth_engine::LoadedModel> {
        let threads = self.threads()?;
        let path = hearth_models::locate::resolve_model(self.model.as_deref())?;
        let device = hearth_engine::parse_device(&self.device)?;
        models::check_pin(&path, self.sha256.as_deref(), self.require_pin)?;
        let start = std::time::Instant::now();
        let options = self.load_options()?;
        let mut model = hearth_engine::LoadedModel::load_with(&path, &device, options)?;
        model.model.set_kv_dtype(self.kv_cache_dtype);
        tracing::info!(
            path = %path.display(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            threads,
            "model loaded"
        );
        Ok(model)
    }
}

/// The compute pool, sized by the command's `--threads`.
fn compute_pool(command: &Command) -> anyhow::Result<rayon::ThreadPool> {
    let model_args = match command {
        Command::Run(a) => a.model_args(),
        Command::Bench(a) => a.model_args(),
        Command::Serve(a) => a.model_args(),
        Command::Keys(_) | Command::Audit(_) | Command::Models(_) => {
            return Ok(rayon::ThreadPoolBuilder::new().num_threads(1).build()?)
        }
    };
    let threads = model_args.threads()?;
    // candle's CPU kernels size their work by RAYON_NUM_THREADS; set it before the first
    // tensor op so both agree.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("hearth-compute-{i}"))
        .build()?)
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours on a terminal only: log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = compute_pool(&cli.command).and_then(|pool| match cli.command {
        Command::Keys(args) => admin::keys(args),
        Command::Audit(args) => admin::audit(args),
        Command::Models(args) => models::models(args),
        // The server's scheduler thread runs its steps on the pool itself.
        Command::Serve(args) => serve::serve(args, pool),
        Command::Bench(bench::BenchArgs {
            command: Some(bench::BenchCommand::Serve(args)),
            ..
        }) => loadgen::bench_serve(args),
        // The whole command runs on a pool worker, so each matmul's parallel loop
        // splits among workers that are already awake instead of waking them from a
        // foreign thread ~200 times per token.
        command => pool.install(|| match command {
            Command::Run(args) => run::run(args),
            Command::Bench(args) => bench::bench(args),
            Command::Serve(_) | Command::Keys(_) | Command::Audit(_) | Command::Models(_) => {
                unreachable!("run above")
            }
        }),
    });
    if let Err(e) = result {
        // One line: the chain of causes joined with ": ".
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
