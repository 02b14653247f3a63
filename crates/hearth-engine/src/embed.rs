//! Sentence embeddings: BERT-family encoders (candle-transformers' BERT) from Hugging
//! Face folders, pooled and normalised as the folder's sentence-transformers files say
//! (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), and a batcher
//! thread that runs the inputs of concurrent requests through the encoder together.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde_json::Value;

use crate::EngineError;

/// How token vectors become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

/// A loaded sentence-embedding model.
pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
    dim: usize,
    pad_id: u32,
    device: Device,
}

fn load_err(path: &Path, m: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("{}: {m}", path.display()))
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    hearth_models::hf::read_json(path).map_err(|e| EngineError::Load(e.to_string()))
}

impl Embedder {
    /// Whether `dir` holds an encoder for embeddings (a BERT-family `config.json`), not a
    /// decoder.
    pub fn is_embedding_folder(dir: &Path) -> bool {
        let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        matches!(
            v["model_type"].as_str(),
            Some("bert" | "roberta" | "xlm-roberta" | "distilbert")
        ) || dir.join("modules.json").is_file()
    }

    /// Loads the encoder, its tokenizer and its pooling from a folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        let config_path = dir.join("config.json");
        let raw = read_json(&config_path)?;
        let model_type = raw["model_type"].as_str().unwrap_or("");
        if model_type != "bert" {
            return Err(load_err(
                &config_path,
                format!("embedding model_type `{model_type}` is not supported (bert)"),
            ));
        }
        let config: Config = serde_json::from_value(raw)
            .map_err(|e| load_err(&config_path, format!("not a BERT config: {e}")))?;
        let weights = dir.join("model.safetensors");
        // Safety: a read-only map of a model file that is not modified while served.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(std::slice::from_ref(&weights), DType::F32, device)
        }
        .map_err(|e| load_err(&weights, e))?;
        let model = BertModel::load(vb, &config).map_err(|e| load_err(&weights, e))?;

        // sentence-transformers: pooling and normalisation (defaults: mean, normalised
        // only when modules.json lists Normalize).
        let modules = dir.join("modules.json");
        let (mut pooling, mut normalize) = (Pooling::Mean, false);
        if modules.is_file() {
            let list = read_json(&modules)?;
            for m in list.as_array().into_iter().flatten() {
                let kind = m["type"].as_str().unwrap_or("");
                if kind.ends_with(".Normalize") {
                    normalize = true;
                }
                if kind.ends_with(".Pooling") {
                    let p = dir
                        .join(m["path"].as_str().unwrap_or("1_Pooling"))
                        .join("config.json");
                    let c = read_json(&p)?;
                    let on = |k: &str| c[k].as_bool() == Some(true);
                    pooling = match (
                        on("pooling_mode_mean_tokens"),
                        on("pooling_mode_cls_token"),
                        on("pooling_mode_max_tokens"),
                        on("pooling_mode_mean_sqrt_len_tokens"),
                    ) {
                        (true, false, false, false) => Pooling::Mean,
                        (false, true, false, false) => Pooling::Cls,
                        (false, false, true, false) => Pooling::Max,
                        (false, false, false, true) => Pooling::MeanSqrtLen,
                        _ => return Err(load_err(
                            &p,
                            "exactly one pooling mode (mean, cls, max, mean_sqrt_len) must be on",
                        )),
                    };
                }
            }
        }
        let st = dir.join("sentence_bert_config.json");
        let max_tokens = if st.is_file() {
            read_json(&st)?["max_seq_length"]
                .as_u64()
                .map(|n| n as usize)
        } else {
            None
        }
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);

        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load_err(&tok_path, e))?;
        Ok(Self {
            model,
            tokenizer,
            pooling,
            normalize,
            max_tokens,
            dim: config.hidden_size,
            pad_id: config.pad_token_id as u32,
            device: device.clone(),
        })
    }

    /// Length of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens an input keeps (longer inputs are truncated, as sentence-transformers does).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Token ids of `text`, with the model's special tokens, truncated to `max_tokens`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Input(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One vector per input (token ids), all inputs in one forward pass (padded to the
    /// longest, padding masked out).
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let len = inputs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        if len > self.max_tokens {
            return Err(EngineError::Input(format!(
                "an input has {len} tokens; this model takes at most {}",
                self.max_tokens
            )));
        }
        let n = inputs.len();
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for i in inputs {
            ids.extend(
                i.iter()
                    .copied()
                    .chain(std::iter::repeat_n(self.pad_id, len - i.len())),
            );
            mask.extend(
                std::iter::repeat_n(1u32, i.len()).chain(std::iter::repeat_n(0u32, len - i.len())),
            );
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let sum = hidden.broadcast_mul(&m)?.sum(1)?; // (n, dim)
                let count = m.sum(1)?.clamp(1e-9f64, f64::MAX)?; // (n, 1)
                let count = match self.pooling {
                    Pooling::Mean => count,
                    _ => count.sqrt()?,
                };
                sum.broadcast_div(&count)?
            }
            Pooling::Max => {
                // Padding cannot win the max.
                let low = ((m.ones_like()? - &m)? * -1e9)?;
                hidden.broadcast_add(&low)?.max(1)?
            }
        };
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12f64, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// One request's inputs waiting for the batcher.
struct Job {
    inputs: Vec<Vec<u32>>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// What the batcher has done.
#[derive(Debug, Default)]
pub struct EmbedStats {
    /// Forward passes run.
    pub batches: AtomicU64,
    /// Inputs embedded.
    pub inputs: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
}

/// The embedder behind a batching thread: requests that arrive while a pass runs go
/// into the next pass together (up to `max_batch` inputs).
#[derive(Clone)]
pub struct EmbedHandle {
    tx: mpsc::Sender<Job>,
    pub embedder: Arc<Embedder>,
    pub stats: Arc<EmbedStats>,
}

impl EmbedHandle {
    pub fn spawn(
        embedder: Embedder,
        max_batch: usize,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self, EngineError> {
        let embedder = Arc::new(embedder);
        let stats = Arc::new(EmbedStats::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let (e, s) = (embedder.clone(), stats.clone());
        std::thread::Builder::new()
            .name("hearth-embed".into())
            .spawn(move || batcher(&e, &s, &rx, max_batch.max(1), &pool))
            .map_err(|e| EngineError::Device(format!("cannot start the embedding thread: {e}")))?;
        Ok(Self {
            tx,
            embedder,
            stats,
        })
    }

    /// Embeds `inputs` (token ids); resolves when their batch has run.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job { inputs, reply })
            .map_err(|_| "the embedding thread has stopped".to_owned())?;
        rx.await
            .map_err(|_| "the embedding thread dropped a request".to_owned())?
    }
}

fn batcher(
    e: &Embedder,
    stats: &EmbedStats,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    pool: &rayon::ThreadPool,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut count = jobs[0].inputs.len();
        while count < max_batch {
            match rx.try_recv() {
                Ok(j) => {
                    count += j.inputs.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // Similar lengths together waste less on padding: sort by length, run in
        // chunks of `max_batch`, put the results back in order.
        let mut all: Vec<(usize, &Vec<u32>)> = jobs
            .iter()
            .flat_map(|j| j.inputs.iter())
            .enumerate()
            .collect();
        all.sort_by_key(|(_, i)| i.len());
        let mut out: Vec<Option<Result<Vec<f32>, String>>> = vec![None; all.len()];
        for chunk in all.chunks(max_batch) {
            let inputs: Vec<Vec<u32>> = chunk.iter().map(|(_, i)| (*i).clone()).collect();
            let result = pool.install(|| e.embed(&inputs));
            stats.batches.fetch_add(1, Relaxed);
            match result {
                Ok(vs) => {
                    for ((at, _), v) in chunk.iter().zip(vs) {
                        out[*at] = Some(Ok(v));
                    }
                }
                Err(err) => {
                    for (at, _) in chunk {
                        out[*at] = Some(Err(err.to_string()));
                    }
                }
            }
        }
        stats.inputs.fetch_add(all.len() as u64, Relaxed);
        let mut results = out.into_iter();
        for job in jobs {
            stats.requests.fetch_add(1, Relaxed);
            let mine: Result<Vec<Vec<f32>>, String> = results
                .by_ref()
                .take(job.inputs.len())
                .map(|r| r.unwrap_or_else(|| Err("lost".into())))
                .collect();
            let _ = job.reply.send(mine);
        }
    }
}
