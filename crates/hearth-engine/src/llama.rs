//! The decoder of the Llama family (Llama 1–3, SmolLM, TinyLlama, Mistral, Qwen2/2.5,
//! Qwen3) over GGUF or safetensors weights.
//!
//! Pre-norm blocks: RMSNorm → grouped-query attention with interleaved RoPE → residual,
//! RMSNorm → SwiGLU MLP → residual. Switches from the config: q/k/v biases (Qwen2),
//! per-head q/k RMSNorm (Qwen3), a sliding attention window (Mistral), llama3 rope
//! scaling. Weights whose q/k rows rotate halves (Hugging Face checkpoints, Qwen GGUFs)
//! have those rows reordered at load into adjacent pairs, so one rotation kernel serves.
//!
//! On the CPU the whole step runs on `hearth-kernels` over plain buffers, with llama.cpp's
//! numerics (Q8 activations, f16 KV cache, ggml's expf and summation orders), so greedy
//! output matches llama.cpp token for token. Other devices run the same graph as candle
//! tensor ops.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use hearth_kernels::attention::{attend_batch, AttendCall, AttentionShape, KvView};
use hearth_kernels::math::{rms_norm, rms_norm_here, swiglu_here};
use hearth_kernels::matmul::{Arithmetic, Input, Output, QFormat, QMatrix};
use hearth_kernels::rope::{rope_cache, rope_interleaved};
use hearth_models::{GgmlType, ModelConfig, RopeScaling, TensorInfo, Weights};

use crate::kv_cache::{BlockTable, HostWrite, KvCache, KvDtype, BLOCK_SIZE};
use crate::EngineError;

/// A weight matrix applied as `x · Wᵀ`: our own kernels for the formats they cover on the
/// CPU, candle's quantized matmul for everything else.
enum Linear {
    Native(QMatrix),
    Candle(QMatMul, Arc<QTensor>),
    /// f32, f16 or bf16 weights kept in their own type, `[out, in]`; the product is
    /// computed in that type (as PyTorch does with such weights) and returned as f32.
    Dense(Tensor),
}

impl Linear {
    /// `m` rows of input features in, `m` rows of output features out (CPU).
    fn forward_host(&self, x: &[f32], m: usize) -> Result<Vec<f32>, EngineError> {
        let mut out = Vec::new();
        self.forward_into(x, m, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward_host`] into `out` (resized), reusing its allocation.
    fn forward_into(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
        let input = || Tensor::from_slice(x, (m, x.len() / m), &Device::Cpu);
        let product = match self {
            Linear::Native(w) => {
                out.resize(m * w.rows(), 0.0);
                w.matmul(x, out);
                return Ok(());
            }
            Linear::Candle(q, _) => q.forward(&input()?)?,
            Linear::Dense(w) => dense(&input()?, w)?,
        };
        *out = product.flatten_all()?.to_vec1::<f32>()?;
        Ok(())
    }

    /// The product of `input`'s `m` rows stored in or added to `out` (`m` rows of this
    /// matrix's outputs): with our kernels, the rows are made and the products added in
    /// the matmul's own passes.
    fn apply(
        &self,
        input: Input<'_>,
        m: usize,
        out: &mut [f32],
        output: Output,
    ) -> Result<(), EngineError> {
        if let Linear::Native(w) = self {
            w.matmul_parts_with(input, &mut [out], output);
            return Ok(());
        }
        let y = self.forward_host(&input.rows(), m)?;
        if y.len() != out.len() {
            return Err(EngineError::Device(format!(
                "a product of {} values for an output of {}",
                y.len(),
                out.len()
            )));
        }
        match output {
            Output::Set => out.copy_from_slice(&y),
            Output::Add => out.iter_mut().zip(&y).for_each(|(o, y)| *o += y),
        }
        Ok(())
    }

    /// [`Self::forward_host`] with each row in a vector of its own (a batch's logits).
    fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        match self {
            Linear::Native(w) => Ok(w.matmul_rows(x)),
            _ => {
                let out = self.forward_host(x, m)?;
                Ok(out
                    .chunks_exact(out.len() / m.max(1))
                    .map(<[f32]>::to_vec)
                    .collect())
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        match self {
            Linear::Native(w) => {
                let (m, _) = x.dims2()?;
                let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let out = self.forward_host(&xs, m)?;
                Ok(Tensor::from_vec(out, (m, w.rows()), x.device())?)
            }
            Linear::Candle(q, _) => Ok(q.forward(x)?),
            Linear::Dense(w) => Ok(dense(x, w)?),
        }
    }

    /// [`Self::rows_host`] into `out` (resized), reusing its allocation.
    fn rows_host_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<(), EngineError> {
        match self {
            Linear::Native(w) => {
                let k = w.cols();
                out.resize(ids.len() * k, 0.0);
                for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
                    w.dequantize_row(id as usize, o);
                }
            }
            _ => *out = self.rows_host(ids)?,
        }
        Ok(())
    }

    /// Rows `ids` of the matrix as f32: the embedding lookup.
    fn rows_host(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        match self {
            Linear::Native(w) => {
                let k = w.cols();
                let mut out = vec![0f32; ids.len() * k];
                for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
                    w.dequantize_row(id as usize, o);
                }
                Ok(out)
            }
            Linear::Dense(w) => {
                let ids = Tensor::new(ids, w.device())?;
                Ok(w.index_select(&ids, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            }
            Linear::Candle(_, t) => {
                let ids = Tensor::new(ids, &t.device())?;
                Ok(t.embedding(&ids)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            }
        }
    }
}

/// A step's activation buffers on the CPU path, kept on the thread between steps.
#[derive(Default)]
struct StepBuffers {
    x: Vec<f32>,
    att: Vec<f32>,
    /// q or k before its per-head norm (Qwen3).
    head_src: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl StepBuffers {
    /// Most bytes kept between steps (a 512-token chunk of the default model takes ~15 MB).
    const KEEP: usize = 64 << 20;

    fn bytes(&self) -> usize {
        let all = [
            &self.x,
            &self.att,
            &self.head_src,
            &self.q,
            &self.k,
            &self.v,
            &self.gate,
            &self.up,
        ];
        all.iter().map(|b| b.capacity() * 4).sum()
    }
}

thread_local! {
    static STEP: std::cell::RefCell<StepBuffers> = std::cell::RefCell::new(StepBuffers::default());
}

/// `x · wᵀ` in `w`'s type, as f32.
fn dense(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)
}

/// Projections of the same input (q, k, v; gate, up). On the CPU, when they share a
/// format our kernels take, they are one matrix — rows stacked — so the input is quantized
/// once and the step has one parallel matmul instead of N; each output element is the same
/// dot product as with separate matrices.
enum Fused<const N: usize> {
    Stacked(QMatrix, [usize; N]),
    Separate([Linear; N]),
}

impl<const N: usize> Fused<N> {
    fn forward_host(&self, x: &[f32], m: usize) -> Result<[Vec<f32>; N], EngineError> {
        let mut out: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        self.forward_into(Input::Rows(x), m, out.each_mut())?;
        Ok(out)
    }

    /// The product of `x`'s rows (of the norm weight's length) through the RMS norm
    /// with weight `w`: with a stacked matrix, each row is normed in the matmul's own
    /// pass over the rows, where it is quantized.
    fn forward_normed(
        &self,
        x: &[f32],
        w: &[f32],
        eps: f32,
        out: [&mut Vec<f32>; N],
    ) -> Result<(), EngineError> {
        let h = w.len();
        let rows = x.len() / h;
        let make = |rs: Range<usize>, o: &mut [f32]| {
            rms_norm_here(&x[rs.start * h..rs.end * h], w, eps, o)
        };
        let input = Input::Made {
            rows,
            cols: h,
            make: &make,
        };
        self.forward_into(input, rows, out)
    }

    /// [`Self::forward_host`] into `out` (resized), reusing their allocations; a stacked
    /// matrix writes each projection's columns straight into its own buffer.
    fn forward_into(
        &self,
        x: Input<'_>,
        m: usize,
        out: [&mut Vec<f32>; N],
    ) -> Result<(), EngineError> {
        match self {
            Fused::Stacked(w, rows) => {
                let mut parts: [&mut [f32]; N] = out
                    .into_iter()
                    .zip(rows)
                    .map(|(o, &r)| {
                        o.resize(m * r, 0.0);
                        &mut o[..]
                    })
                    .collect::<Vec<_>>()
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("N parts"));
                w.matmul_parts_with(x, &mut parts, Output::Set);
            }
            Fused::Separate(ws) => {
                let x = x.rows();
                for (o, w) in out.into_iter().zip(ws) {
                    w.forward_into(&x, m, o)?;
                }
            }
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<[Tensor; N], EngineError> {
        match self {
            Fused::Stacked(_, rows) => {
                let (m, _) = x.dims2()?;
                let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let parts = self.forward_host(&xs, m)?;
                let mut out = Vec::with_capacity(N);
                for (p, &n) in parts.into_iter().zip(rows) {
                    out.push(Tensor::from_vec(p, (m, n), x.device())?);
                }
                Ok(out.try_into().unwrap_or_else(|_| unreachable!("N parts")))
            }
            Fused::Separate(ws) => {
                let mut out = Vec::with_capacity(N);
                for w in ws {
                    out.push(w.forward(x)?);
                }
                Ok(out.try_into().unwrap_or_else(|_| unreachable!("N parts")))
            }
        }
    }
}

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

/// The weight formats our own CPU kernels take.
fn native_format(t: GgmlType) -> Option<QFormat> {
    match t {
        GgmlType::Q4_0 => Some(QFormat::Q4_0),
        GgmlType::Q4_1 => Some(QFormat::Q4_1),
        GgmlType::Q5_0 => Some(QFormat::Q5_0),
        GgmlType::Q5_1 => Some(QFormat::Q5_1),
        GgmlType::Q8_0 => Some(QFormat::Q8_0),
        GgmlType::Q4K => Some(QFormat::Q4K),
        GgmlType::Q5K => Some(QFormat::Q5K),
        GgmlType::Q6K => Some(QFormat::Q6K),
        _ => None,
    }
}

/// Reorders the rows of a q/k projection (or the entries of its bias or norm) from
/// rotate-half layout to adjacent pairs: in each head of `head_dim` rows, row `i` and
/// row `i + rope_dim/2` become rows `2i` and `2i + 1` (rows past `rope_dim` stay).
fn pairs_from_halves(bytes: &[u8], rows: usize, head_dim: usize, rope_dim: usize) -> Vec<u8> {
    let row = bytes.len() / rows;
    let half = rope_dim / 2;
    let mut out = bytes.to_vec();
    for h in 0..rows / head_dim {
        let base = h * head_dim;
        for i in 0..half {
            for (dst, src) in [(2 * i, i), (2 * i + 1, i + half)] {
                let (d, s) = ((base + dst) * row, (base + src) * row);
                out[d..d + row].copy_from_slice(&bytes[s..s + row]);
            }
        }
    }
    out
}

/// How weights are stored once loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Convert f32/f16/bf16 weight matrices to this type at load (`--quantize q8_0`,
    /// `--dtype f16`); matrices already quantized, and those whose rows are not whole
    /// blocks of the type, stay as they are.
    pub convert: Option<GgmlType>,
    /// How our CPU kernels sum quantized dot products (`--arithmetic`).
    pub arithmetic: Arithmetic,
}

/// Reads named tensors out of a model's weights onto a device.
struct Loader<'a> {
    weights: &'a Weights,
    device: &'a Device,
    config: &'a ModelConfig,
    options: LoadOptions,
    /// Matrices converted by `options.convert`.
    converted: std::cell::Cell<usize>,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.weights
            .tensors()
            .get(name)
            .ok_or_else(|| EngineError::Load(format!("missing tensor `{name}`")))
    }

    /// The tensor's bytes; q/k rows (and their biases and norms) of a rotate-half model
    /// reordered into adjacent pairs.
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>, EngineError> {
        let info = self.info(name)?;
        let data = self.weights.tensor_data(info);
        let c = self.config;
        let qk = [".attn_q.", ".attn_k.", ".attn_q_norm.", ".attn_k_norm."]
            .iter()
            .any(|p| name.contains(p));
        if !(c.rope_neox && qk) {
            return Ok(Cow::Borrowed(data));
        }
        // Rows: the outermost dimension (the only one of a bias or norm).
        let rows = *info.dims.last().unwrap_or(&1);
        if rows % c.head_dim != 0 {
            return Err(EngineError::Load(format!(
                "tensor `{name}`: {rows} rows are not whole heads of {}",
                c.head_dim
            )));
        }
        Ok(Cow::Owned(pairs_from_halves(
            data, rows, c.head_dim, c.rope_dim,
        )))
    }

    fn qtensor(&self, name: &str) -> Result<QTensor, EngineError> {
        let info = self.info(name)?;
        // The reader guarantees the slice holds exactly the tensor's bytes.
        qtensor_from_ggml(
            candle_dtype(info.dtype),
            &self.bytes(name)?,
            info.shape(),
            self.device,
        )
        .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))
    }

    /// A weight matrix's type and bytes, converted as `options.convert` says.
    fn matrix(&self, name: &str) -> Result<(GgmlType, Cow<'_, [u8]>), EngineError> {
        let info = self.info(name)?;
        let bytes = self.bytes(name)?;
        let float = matches!(info.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
        match self.options.convert {
            Some(to)
                if float
                    && to != info.dtype
                    && info.dims.len() == 2
                    && info.dims[0].is_multiple_of(to.block_size()) =>
            {
                let load = |e: candle_core::Error| {
                    EngineError::Load(format!("tensor `{name}`: converting to {to}: {e}"))
                };
                let src =
                    qtensor_from_ggml(candle_dtype(info.dtype), &bytes, info.shape(), &Device::Cpu)
                        .map_err(load)?;
                let f = src.dequantize(&Device::Cpu).map_err(load)?;
                let q = QTensor::quantize(&f, candle_dtype(to)).map_err(load)?;
                self.converted.set(self.converted.get() + 1);
                Ok((to, Cow::Owned(q.data().map_err(load)?.into_owned())))
            }
            _ => Ok((info.dtype, bytes)),
        }
    }

    fn linear(&self, name: &str) -> Result<Linear, EngineError> {
        let (dtype, bytes) = self.matrix(name)?;
        self.linear_from(name, dtype, &bytes)
    }

    /// The matrix `name` from its (already converted) type and bytes.
    fn linear_from(
        &self,
        name: &str,
        dtype: GgmlType,
        bytes: &[u8],
    ) -> Result<Linear, EngineError> {
        let info = self.info(name)?;
        let format = native_format(dtype);
        if let (Some(format), true, &[k, n]) = (format, self.device.is_cpu(), &info.dims[..]) {
            let mut w = QMatrix::from_bytes(format, bytes, n, k)
                .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))?;
            w.set_arithmetic(self.options.arithmetic);
            return Ok(Linear::Native(w));
        }
        let float = match dtype {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let Some(dt) = float {
            let w = Tensor::from_raw_buffer(bytes, dt, &info.shape(), self.device)
                .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))?;
            return Ok(Linear::Dense(w));
        }
        let t = qtensor_from_ggml(candle_dtype(dtype), bytes, info.shape(), self.device)
            .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))?;
        let t = Arc::new(t);
        Ok(Linear::Candle(QMatMul::from_arc(t.clone())?, t))
    }

    /// Projections of one input, stacked into one matrix when our kernels take them all.
    fn fused<const N: usize>(&self, names: [String; N]) -> Result<Fused<N>, EngineError> {
        let infos = names
            .iter()
            .map(|n| self.info(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mats = names
            .iter()
            .map(|n| self.matrix(n))
            .collect::<Result<Vec<_>, _>>()?;
        let format = native_format(mats[0].0);
        let k = infos[0].dims.first().copied();
        let stackable = self.device.is_cpu()
            && infos.iter().zip(&mats).all(|(i, (dtype, _))| {
                *dtype == mats[0].0 && i.dims.len() == 2 && i.dims.first().copied() == k
            });
        if let (Some(format), true, Some(k)) = (format, stackable, k) {
            let rows: [usize; N] = std::array::from_fn(|i| infos[i].dims[1]);
            let mut bytes = Vec::new();
            for (_, b) in &mats {
                bytes.extend_from_slice(b);
            }
            let mut w = QMatrix::from_bytes(format, &bytes, rows.iter().sum(), k)
                .map_err(|e| EngineError::Load(format!("tensors {names:?}: {e}")))?;
            w.set_arithmetic(self.options.arithmetic);
            return Ok(Fused::Stacked(w, rows));
        }
        // Not stackable: each matrix on its own, from the bytes read (and converted) above.
        let mut linears = Vec::with_capacity(N);
        for (n, (dtype, bytes)) in names.iter().zip(&mats) {
            linears.push(self.linear_from(n, *dtype, bytes)?);
        }
        Ok(Fused::Separate(
            linears
                .try_into()
                .unwrap_or_else(|_| unreachable!("N names")),
        ))
    }

    /// A small tensor (norm weights, rope factors) dequantized to f32.
    fn norm(&self, name: &str) -> Result<Norm, EngineError> {
        let tensor = self
            .qtensor(name)?
            .dequantize(self.device)?
            .to_dtype(DType::F32)?;
        let host = tensor.to_vec1::<f32>()?;
        Ok(Norm { host, tensor })
    }

    /// The q, k, v biases of layer `i`, if the model has them.
    fn qkv_bias(&self, i: usize) -> Result<Option<[Norm; 3]>, EngineError> {
        if !self.config.attn_bias {
            return Ok(None);
        }
        let p = |n: &str| format!("blk.{i}.{n}.bias");
        Ok(Some([
            self.norm(&p("attn_q"))?,
            self.norm(&p("attn_k"))?,
            self.norm(&p("attn_v"))?,
        ]))
    }
}

/// An RMSNorm weight, kept both as host memory and as a device tensor.
struct Norm {
    host: Vec<f32>,
    tensor: Tensor,
}

struct Block {
    attn_norm: Norm,
    /// q, k, v.
    qkv: Fused<3>,
    /// Biases of q, k, v (Qwen2).
    qkv_bias: Option<[Norm; 3]>,
    /// Per-head RMSNorm weights of q and k (Qwen3).
    qk_norm: Option<[Norm; 2]>,
    wo: Linear,
    ffn_norm: Norm,
    /// gate, up.
    gate_up: Fused<2>,
    w_down: Linear,
}

/// One sequence's part of a batched forward pass: its new tokens and its block table.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub table: &'a mut BlockTable,
}

/// The loaded decoder.
pub struct Llama {
    config: ModelConfig,
    device: Device,
    embeddings: Arc<Linear>,
    blocks: Vec<Block>,
    output_norm: Norm,
    /// The output projection; the same matrix as `embeddings` when they are tied.
    output: Arc<Linear>,
    /// Per-pair rope frequency divisors (`rope_freqs.weight`), when the file has them.
    rope_factors: Option<Vec<f32>>,
    /// Run the candle-tensor path (the one GPUs take) even on the CPU.
    tensor_path: bool,
    /// What host KV caches store.
    kv_dtype: KvDtype,
}

impl Llama {
    pub fn load(
        weights: &Weights,
        config: &ModelConfig,
        device: &Device,
    ) -> Result<Self, EngineError> {
        Self::load_with(weights, config, device, LoadOptions::default())
    }

    /// Like [`Llama::load`], converting weights as `options` says.
    pub fn load_with(
        weights: &Weights,
        config: &ModelConfig,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, EngineError> {
        let l = Loader {
            weights,
            device,
            config,
            options,
            converted: std::cell::Cell::new(0),
        };
        let embeddings = Arc::new(l.linear("token_embd.weight")?);
        let output = if config.tied_embeddings {
            embeddings.clone()
        } else {
            Arc::new(l.linear("output.weight")?)
        };
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            blocks.push(Block {
                attn_norm: l.norm(&p("attn_norm"))?,
                qkv: l.fused([p("attn_q"), p("attn_k"), p("attn_v")])?,
                qkv_bias: l.qkv_bias(i)?,
                qk_norm: match config.qk_norm {
                    true => Some([l.norm(&p("attn_q_norm"))?, l.norm(&p("attn_k_norm"))?]),
                    false => None,
                },
                wo: l.linear(&p("attn_output"))?,
                ffn_norm: l.norm(&p("ffn_norm"))?,
                gate_up: l.fused([p("ffn_gate"), p("ffn_up")])?,
                w_down: l.linear(&p("ffn_down"))?,
            });
        }
        if let Some(to) = options.convert {
            if l.converted.get() == 0 {
                return Err(EngineError::Load(format!(
                    "no weight matrix could be converted to {to}: they are quantized already, or their rows are not multiples of {} values",
                    to.block_size()
                )));
            }
            tracing::info!(to = %to, matrices = l.converted.get(), "weights converted at load");
        }
        let rope_factors = match &config.rope_scaling {
            RopeScaling::FrequencyFactors => Some(l.norm("rope_freqs.weight")?.host),
            RopeScaling::Factors(f) => Some(f.clone()),
            _ => None,
        };
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            embeddings,
            blocks,
            output_norm: l.norm("output_norm.weight")?,
            output,
            rope_factors,
            tensor_path: false,
            kv_dtype: KvDtype::F16,
        })
    }

    /// Runs the graph as candle tensor ops — the path CUDA and Metal take — on the CPU
    /// too, so that path can be tested without a GPU. Caches must be made after this.
    #[doc(hidden)]
    pub fn use_tensor_path(&mut self) {
        self.tensor_path = true;
    }

    /// Host KV caches made after this store `dtype` cells (f32: attention without f16
    /// rounding, for f32 models checked against f32 references; twice the memory).
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) {
        self.kv_dtype = dtype;
    }

    fn host_path(&self) -> bool {
        self.device.is_cpu() && !self.tensor_path
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV block pool of `num_blocks` blocks.
    pub fn new_cache(&self, num_blocks: usize) -> Result<KvCache, EngineError> {
        let c = &self.config;
        KvCache::with_layout(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            num_blocks,
            &self.device,
            self.host_path(),
            self.kv_dtype,
        )
    }

    /// A KV block pool that holds `sequences` sequences of the full context length (on
    /// the CPU, memory is only taken as blocks are written).
    pub fn cache_for_sequences(&self, sequences: usize) -> Result<KvCache, EngineError> {
        let blocks = KvCache::blocks_for(self.config.context_length);
        self.new_cache(blocks * sequences.max(1))
    }

    /// Bytes one KV block takes.
    pub fn kv_block_bytes(&self) -> usize {
        let c = &self.config;
        let dtype = if self.host_path() {
            self.kv_dtype
        } else {
            KvDtype::F16
        };
        KvCache::block_bytes(c.num_layers, c.num_kv_heads, c.head_dim, dtype)
    }

    /// Runs `tokens` (at positions `table.len()..`) through the decoder, appends their
    /// keys and values to the sequence's blocks, and returns the logits of the last
    /// position as f32.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        table: &mut BlockTable,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let mut logits = self.forward_batch(cache, &mut [BatchItem { tokens, table }])?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// Runs several sequences in one pass: every matmul takes the rows of all of them, so
    /// the weights are read once per step however many sequences there are; attention
    /// runs per sequence over its own blocks. Returns each item's last-position logits.
    /// Each sequence's result is bit-identical to running it alone. Blocks for the new
    /// tokens are taken from `cache` as needed; when it has too few, nothing runs.
    pub fn forward_batch(
        &self,
        cache: &mut KvCache,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let c = &self.config;
        for item in items.iter() {
            let (seq, pos) = (item.tokens.len(), item.table.len());
            if seq == 0 {
                return Err(EngineError::Input("no tokens to run".into()));
            }
            if pos + seq > c.context_length {
                return Err(EngineError::ContextOverflow {
                    needed: pos + seq,
                    context: c.context_length,
                });
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(EngineError::Input(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
        }
        let freq_scale = match c.rope_scaling {
            RopeScaling::Linear { factor } => 1.0 / factor,
            _ => 1.0,
        };
        let mut ropes = Vec::with_capacity(items.len());
        for item in items.iter_mut() {
            let total = item.table.len() + item.tokens.len();
            if !cache.allocate(item.table, total) {
                return Err(EngineError::KvCacheFull {
                    needed: KvCache::blocks_for(total),
                    free: cache.free_blocks(),
                });
            }
        }
        for item in items.iter_mut() {
            let pos = item.table.len();
            let positions: Vec<usize> = (pos..pos + item.tokens.len()).collect();
            ropes.push(rope_cache(
                &positions,
                c.rope_dim,
                c.rope_theta,
                freq_scale,
                self.rope_factors.as_deref(),
            ));
        }
        let logits = if self.host_path() {
            self.forward_host(cache, items, &ropes)?
        } else {
            let mut out = Vec::with_capacity(items.len());
            for (item, rope) in items.iter_mut().zip(&ropes) {
                out.push(self.forward_device(cache, item.table, item.tokens, rope)?);
            }
            out
        };
        for item in items.iter_mut() {
            let total = item.table.len() + item.tokens.len();
            KvCache::commit(item.table, total);
        }
        Ok(logits)
    }

    fn forward_host(
        &self,
        cache: &mut KvCache,
        items: &mut [BatchItem<'_>],
        ropes: &[Vec<(f32, f32)>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let c = &self.config;
        let (nh, nkv, hd, h) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size);
        let (qw, kvw) = (nh * hd, nkv * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let tokens: Vec<u32> = items
            .iter()
            .flat_map(|i| i.tokens.iter().copied())
            .collect();
        let rows = tokens.len();
        // First row of each item in the flattened batch.
        let mut starts = Vec::with_capacity(items.len());
        let mut acc = 0;
        for item in items.iter() {
            starts.push(acc);
            acc += item.tokens.len();
        }
        // Every layer's activations, in buffers kept from step to step on this thread (a
        // fresh allocation of a few MB is a few hundred page faults, every step).
        let mut bufs = STEP.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let StepBuffers {
            x,
            att,
            head_src,
            q,
            k,
            v,
            gate,
            up,
        } = &mut bufs;
        self.embeddings.rows_host_into(&tokens, x)?;
        att.resize(rows * qw, 0.0);
        let att = &mut att[..rows * qw];
        let eps = c.rms_norm_eps;
        for (layer, b) in self.blocks.iter().enumerate() {
            b.qkv
                .forward_normed(x, &b.attn_norm.host, eps, [&mut *q, &mut *k, &mut *v])?;
            if let Some(bias) = &b.qkv_bias {
                for (t, bias) in [&mut *q, &mut *k, &mut *v].into_iter().zip(bias) {
                    for row in t.chunks_exact_mut(bias.host.len()) {
                        row.iter_mut().zip(&bias.host).for_each(|(a, b)| *a += b);
                    }
                }
            }
            if let Some([qn, kn]) = &b.qk_norm {
                // Each head's vector normalised on its own (rms_norm's rows are the
                // weight's length: one head).
                for (t, w) in [(&mut *q, qn), (&mut *k, kn)] {
                    head_src.clear();
                    head_src.extend_from_slice(t);
                    rms_norm(head_src, &w.host, c.rms_norm_eps, t);
                }
            }
            // Each sequence's queries and keys rotated, its keys and values stored: one
            // task per sequence.
            let mut parts = Vec::with_capacity(items.len());
            let (mut q_rest, mut k_rest) = (&mut q[..], &mut k[..]);
            for item in items.iter() {
                let seq = item.tokens.len();
                let (qi, qt) = std::mem::take(&mut q_rest).split_at_mut(seq * qw);
                let (ki, kt) = std::mem::take(&mut k_rest).split_at_mut(seq * kvw);
                (q_rest, k_rest) = (qt, kt);
                parts.push((qi, ki));
            }
            hearth_kernels::team::for_each_chunk_mut(
                &mut parts,
                1,
                || (),
                |_, i, part| {
                    let (qi, ki) = &mut part[0];
                    rope_interleaved(qi, nh, hd, c.rope_dim, &ropes[i]);
                    rope_interleaved(ki, nkv, hd, c.rope_dim, &ropes[i]);
                },
            );
            drop(parts);
            let writes: Vec<HostWrite> = items
                .iter()
                .zip(&starts)
                .map(|(item, &start)| {
                    let span = start * kvw..(start + item.tokens.len()) * kvw;
                    HostWrite {
                        table: item.table,
                        k: &k[span.clone()],
                        v: &v[span],
                    }
                })
                .collect();
            cache.write_host_batch(layer, &writes)?;
            drop(writes);
            let shape = AttentionShape {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                window: c.sliding_window,
            };
            let (kc, vc) = cache.host_layer(layer)?;
            let mut calls = Vec::with_capacity(items.len());
            let mut rest = &mut att[..];
            for (item, &start) in items.iter().zip(&starts) {
                let seq = item.tokens.len();
                let (out, tail) = std::mem::take(&mut rest).split_at_mut(seq * qw);
                rest = tail;
                calls.push(AttendCall {
                    q: &q[start * qw..(start + seq) * qw],
                    seq,
                    pos: item.table.len(),
                    kv: KvView {
                        k: kc,
                        v: vc,
                        blocks: item.table.blocks(),
                        block_size: BLOCK_SIZE,
                    },
                    out,
                });
            }
            attend_batch(&mut calls, shape, scale);
            drop(calls);
            // The residuals are added by the matmuls as they store their products.
            b.wo.apply(Input::Rows(att), rows, x, Output::Add)?;
            b.gate_up
                .forward_normed(x, &b.ffn_norm.host, eps, [&mut *gate, &mut *up])?;
            let (g, u) = (&gate[..], &up[..]);
            let inter = g.len() / rows;
            let act = |rs: Range<usize>, o: &mut [f32]| {
                let span = rs.start * inter..rs.end * inter;
                o.copy_from_slice(&g[span.clone()]);
                swiglu_here(o, &u[span]);
            };
            let input = Input::Made {
                rows,
                cols: inter,
                make: &act,
            };
            b.w_down.apply(input, rows, x, Output::Add)?;
        }
        // The last row of every item, through the final norm and the output projection
        // in one matmul.
        let mut last = Vec::with_capacity(items.len() * h);
        for (item, &start) in items.iter().zip(&starts) {
            let r = start + item.tokens.len() - 1;
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.output_norm.host, c.rms_norm_eps, &mut normed);
        let logits = self.output.forward_rows(&normed, items.len());
        // Kept for the next step, unless a long prompt chunk made them large.
        if bufs.bytes() <= StepBuffers::KEEP {
            STEP.with(|s| *s.borrow_mut() = bufs);
        }
        logits
    }

    fn forward_device(
        &self,
        cache: &mut KvCache,
        table: &BlockTable,
        tokens: &[u32],
        rope: &[(f32, f32)],
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let seq = tokens.len();
        let pos = table.len();
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let n_rep = nh / nkv;
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (hd as f64).sqrt();
        let total = pos + seq;
        let x = self.embeddings.rows_host(tokens)?;
        let mut x = Tensor::from_vec(x, (seq, c.hidden_size), &self.device)?;
        let windowed = c.sliding_window.is_some_and(|w| total > w);
        let mask = if seq > 1 || windowed {
            Some(causal_mask(seq, pos, c.sliding_window, &self.device)?)
        } else {
            None
        };
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm.tensor, eps)?;
            let [mut q, mut k, mut v] = b.qkv.forward(&h)?;
            if let Some([bq, bk, bv]) = &b.qkv_bias {
                q = q.broadcast_add(&bq.tensor)?;
                k = k.broadcast_add(&bk.tensor)?;
                v = v.broadcast_add(&bv.tensor)?;
            }
            if let Some([qn, kn]) = &b.qk_norm {
                let per_head = |t: &Tensor, n: usize, w: &Norm| -> candle_core::Result<Tensor> {
                    candle_nn::ops::rms_norm(&t.reshape((seq * n, hd))?, &w.tensor, eps)?
                        .reshape((seq, n * hd))
                };
                q = per_head(&q, nh, qn)?;
                k = per_head(&k, nkv, kn)?;
            }
            let q = self.rope_device(&q, nh, rope)?;
            let k = self.rope_device(&k, nkv, rope)?;
            // (seq, heads*hd) -> (heads, seq, hd)
            let heads_first = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.reshape((seq, n, hd))?.transpose(0, 1)?.contiguous()
            };
            let q = round_f16(&heads_first(q, nh)?)?;
            let k = k.reshape((seq, nkv, hd))?;
            let v = v.reshape((seq, nkv, hd))?;
            // (nkv, total, hd), gathered from the sequence's blocks.
            let (k_all, v_all) = cache.append_device(layer, table, &k, &v)?;
            // Grouped-query attention without copying K/V per query head: the n_rep
            // query heads that share a KV head become extra rows of one matmul.
            let q = q.reshape((nkv, n_rep * seq, hd))?;
            let att = (q.matmul(&k_all.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att
                    .reshape((nkv, n_rep, seq, total))?
                    .broadcast_add(m)?
                    .reshape((nkv, n_rep * seq, total))?,
                None => att,
            };
            let att = round_f16(&candle_nn::ops::softmax_last_dim(&att)?)?;
            let out = att
                .matmul(&v_all)?
                .reshape((nh, seq, hd))?
                .transpose(0, 1)?
                .reshape((seq, nh * hd))?;
            x = (x + b.wo.forward(&out)?)?;

            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm.tensor, eps)?;
            let [gate, up] = b.gate_up.forward(&h)?;
            let gate = candle_nn::ops::silu(&gate)?;
            x = (x + b.w_down.forward(&(gate * up)?)?)?;
        }
        let last = x.narrow(0, seq - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.output_norm.tensor, eps)?;
        let logits = self.output.forward(&last)?.squeeze(0)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// Rotates the first `rope_dim` dimensions of each head of `x` (seq, heads*hd).
    fn rope_device(
        &self,
        x: &Tensor,
        heads: usize,
        cache: &[(f32, f32)],
    ) -> Result<Tensor, EngineError> {
        let (seq, width) = x.dims2()?;
        let (hd, rd) = (self.config.head_dim, self.config.rope_dim);
        let half = rd / 2;
        let cos: Vec<f32> = cache.iter().map(|c| c.0).collect();
        let sin: Vec<f32> = cache.iter().map(|c| c.1).collect();
        let cos = Tensor::from_vec(cos, (seq, half), x.device())?;
        let sin = Tensor::from_vec(sin, (seq, half), x.device())?;
        let x4 = x
            .reshape((1, seq, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let rotated = if rd == hd {
            candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?
        } else {
            let rot = x4.narrow(D::Minus1, 0, rd)?.contiguous()?;
            let pass = x4.narrow(D::Minus1, rd, hd - rd)?;
            let rot = candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?;
            Tensor::cat(&[&rot, &pass], D::Minus1)?
        };
        Ok(rotated.transpose(1, 2)?.reshape((seq, width))?)
    }
}

/// Rounds to the nearest f16 and back, keeping f32 storage.
fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// (seq, pos + seq): 0 where query i may see key j, -inf after it (and, with a sliding
/// window of `w`, at or before `pos + i - w`).
fn causal_mask(
    seq: usize,
    pos: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor, EngineError> {
    let total = pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                let too_old = window.is_some_and(|w| j + w <= pos + i);
                if j > pos + i || too_old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
}
