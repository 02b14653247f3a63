//! The Llama decoder (Llama 1–3, SmolLM, Mistral) over quantized GGUF weights.
//!
//! Pre-norm blocks: RMSNorm → grouped-query attention with interleaved RoPE → residual,
//! RMSNorm → SwiGLU MLP → residual. Matmuls go through candle's quantized kernels, which
//! quantize the activations once per row (Q8 for the integer dot products).

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use hearth_models::{GgmlType, GgufFile, ModelConfig, RopeScaling};

use crate::kv_cache::KvCache;
use crate::EngineError;

fn candle_dtype(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

/// Reads named tensors out of a GGUF file onto a device.
struct Loader<'a> {
    file: &'a GgufFile,
    device: &'a Device,
}

impl Loader<'_> {
    fn qtensor(&self, name: &str) -> Result<QTensor, EngineError> {
        let info = self
            .file
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::Load(format!("missing tensor `{name}`")))?;
        // The reader guarantees the slice holds exactly the tensor's bytes.
        qtensor_from_ggml(
            candle_dtype(info.dtype),
            self.file.tensor_data(info),
            info.shape(),
            self.device,
        )
        .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))
    }

    fn matmul(&self, name: &str) -> Result<QMatMul, EngineError> {
        Ok(QMatMul::from_qtensor(self.qtensor(name)?)?)
    }

    /// A small tensor (norm weights, rope factors) dequantized to f32.
    fn f32(&self, name: &str) -> Result<Tensor, EngineError> {
        Ok(self
            .qtensor(name)?
            .dequantize(self.device)?
            .to_dtype(DType::F32)?)
    }
}

struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// The loaded decoder.
pub struct Llama {
    config: ModelConfig,
    device: Device,
    embeddings: Arc<QTensor>,
    blocks: Vec<Block>,
    output_norm: Tensor,
    output: QMatMul,
    /// RoPE tables, (positions, rope_dim / 2).
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    pub fn load(
        file: &GgufFile,
        config: &ModelConfig,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let l = Loader { file, device };
        let embeddings = Arc::new(l.qtensor("token_embd.weight")?);
        let output = if config.tied_embeddings {
            QMatMul::from_arc(embeddings.clone())?
        } else {
            l.matmul("output.weight")?
        };
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            blocks.push(Block {
                attn_norm: l.f32(&p("attn_norm"))?,
                wq: l.matmul(&p("attn_q"))?,
                wk: l.matmul(&p("attn_k"))?,
                wv: l.matmul(&p("attn_v"))?,
                wo: l.matmul(&p("attn_output"))?,
                ffn_norm: l.f32(&p("ffn_norm"))?,
                w_gate: l.matmul(&p("ffn_gate"))?,
                w_up: l.matmul(&p("ffn_up"))?,
                w_down: l.matmul(&p("ffn_down"))?,
            });
        }
        let factors = match config.rope_scaling {
            RopeScaling::FrequencyFactors => Some(l.f32("rope_freqs.weight")?.to_vec1::<f32>()?),
            _ => None,
        };
        let (cos, sin) = rope_tables(config, factors.as_deref(), device)?;
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            embeddings,
            blocks,
            output_norm: l.f32("output_norm.weight")?,
            output,
            cos,
            sin,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV cache for one sequence, sized on demand up to the context length.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.num_layers,
            self.config.num_kv_heads,
            self.config.head_dim,
            self.config.context_length,
            &self.device,
        )
    }

    /// Runs `tokens` (at positions `cache.len()..`) through the decoder, appends their
    /// keys and values to `cache`, and returns the logits of the last position as f32.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
        let seq = tokens.len();
        let pos = cache.len();
        if seq == 0 {
            return Err(EngineError::Input("no tokens to run".into()));
        }
        if pos + seq > self.config.context_length {
            return Err(EngineError::ContextOverflow {
                needed: pos + seq,
                context: self.config.context_length,
            });
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let n_rep = nh / nkv;
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (hd as f64).sqrt();

        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embeddings.embedding(&ids)?.to_dtype(DType::F32)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let total = pos + seq;
        let mask = if seq > 1 {
            Some(causal_mask(seq, pos, &self.device)?)
        } else {
            None
        };
        cache.reserve(total)?;

        for (layer, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, eps)?;
            let q = b.wq.forward(&h)?;
            let k = b.wk.forward(&h)?;
            let v = b.wv.forward(&h)?;
            // (seq, heads*hd) -> (1, heads, seq, hd)
            let q = q.reshape((1, seq, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k
                .reshape((1, seq, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v.reshape((seq, nkv, hd))?.transpose(0, 1)?.contiguous()?;
            let q = self.rope(&q, &cos, &sin)?;
            let k = self.rope(&k, &cos, &sin)?.squeeze(0)?;
            let (k_all, v_all) = cache.append(layer, &k, &v)?; // (nkv, total, hd)

            // Grouped-query attention without copying K/V per query head: the n_rep
            // query heads that share a KV head become extra rows of one matmul.
            let q = q.reshape((nkv, n_rep * seq, hd))?;
            let att = (q.matmul(&k_all.t()?)? * scale)?; // (nkv, n_rep*seq, total)
            let att = match &mask {
                Some(m) => att
                    .reshape((nkv, n_rep, seq, total))?
                    .broadcast_add(m)?
                    .reshape((nkv, n_rep * seq, total))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let out = att.matmul(&v_all)?; // (nkv, n_rep*seq, hd)
            let out = out
                .reshape((nh, seq, hd))?
                .transpose(0, 1)?
                .reshape((seq, nh * hd))?;
            x = (x + b.wo.forward(&out)?)?;

            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)?;
            let gate = candle_nn::ops::silu(&b.w_gate.forward(&h)?)?;
            let up = b.w_up.forward(&h)?;
            x = (x + b.w_down.forward(&(gate * up)?)?)?;
        }
        cache.commit(total);

        let last = x.narrow(0, seq - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.output_norm, eps)?;
        let logits = self.output.forward(&last)?.squeeze(0)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, EngineError> {
        let rd = self.config.rope_dim;
        if rd == self.config.head_dim {
            return Ok(candle_nn::rotary_emb::rope_i(x, cos, sin)?);
        }
        let rot = x.narrow(D::Minus1, 0, rd)?.contiguous()?;
        let pass = x.narrow(D::Minus1, rd, self.config.head_dim - rd)?;
        let rot = candle_nn::rotary_emb::rope_i(&rot, cos, sin)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?.contiguous()?)
    }
}

/// cos/sin tables for every position of the context, (positions, rope_dim / 2).
fn rope_tables(
    c: &ModelConfig,
    factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor), EngineError> {
    let half = c.rope_dim / 2;
    let pos_scale = match c.rope_scaling {
        RopeScaling::Linear { factor } => 1.0 / factor as f64,
        _ => 1.0,
    };
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            let f = 1.0 / (c.rope_theta as f64).powf(2.0 * i as f64 / c.rope_dim as f64);
            match factors {
                Some(fs) => f / fs.get(i).copied().unwrap_or(1.0) as f64,
                None => f,
            }
        })
        .collect();
    let n = c.context_length;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv_freq {
            let angle = p as f64 * pos_scale * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

/// (seq, pos + seq): 0 where query i may see key j, -inf after it.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor, EngineError> {
    let total = pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
}
