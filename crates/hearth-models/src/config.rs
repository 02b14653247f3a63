//! The typed shape of a model, read from GGUF metadata and checked against its tensors.

use crate::gguf::{GgufError, GgufFile};

/// Architectures whose decoder Hearth implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The decoder family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, Mistral (GGUF stores Mistral as `llama`).
    Llama,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
        }
    }
}

/// How rotary position embeddings are stretched beyond the trained context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Per-frequency factors shipped in the file (`rope_freqs.weight`, Llama 3.1 style).
    FrequencyFactors,
}

/// Everything the engine needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub name: Option<String>,
    pub context_length: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f32,
    pub vocab_size: usize,
    /// The output projection reuses the token embedding matrix.
    pub tied_embeddings: bool,
}

/// Upper bounds that no real model reaches; metadata beyond them is corrupt.
const MAX_CONTEXT: u64 = 1 << 24;
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 1024;

impl ModelConfig {
    /// Reads and validates the config of a GGUF model.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, GgufError> {
        let arch = f
            .str_key("general.architecture")?
            .ok_or_else(|| f.error("missing metadata key `general.architecture`"))?;
        let architecture = match arch {
            "llama" => Architecture::Llama,
            other => {
                return Err(f.error(format!(
                    "unsupported architecture `{other}` (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let bounded = |k: &str, max: u64| -> Result<usize, GgufError> {
            let v = f.u64_key(&key(k))?;
            if v == 0 || v > max {
                return Err(f.error(format!(
                    "metadata `{}` = {v} is out of range (1..={max})",
                    key(k)
                )));
            }
            Ok(v as usize)
        };
        let context_length = bounded("context_length", MAX_CONTEXT)?;
        let hidden_size = bounded("embedding_length", MAX_DIM)?;
        let intermediate_size = bounded("feed_forward_length", MAX_DIM)?;
        let num_layers = bounded("block_count", MAX_LAYERS)?;
        let num_heads = bounded("attention.head_count", MAX_DIM)?;
        let num_kv_heads = match f.get(&key("attention.head_count_kv")) {
            None => num_heads,
            Some(_) => bounded("attention.head_count_kv", MAX_DIM)?,
        };
        if hidden_size % num_heads != 0 {
            return Err(f.error(format!(
                "embedding_length {hidden_size} is not divisible by head_count {num_heads}"
            )));
        }
        if num_heads % num_kv_heads != 0 {
            return Err(f.error(format!(
                "head_count {num_heads} is not a multiple of head_count_kv {num_kv_heads}"
            )));
        }
        let head_dim = match f.get(&key("attention.key_length")) {
            None => hidden_size / num_heads,
            Some(_) => bounded("attention.key_length", MAX_DIM)?,
        };
        let rope_dim = match f.get(&key("rope.dimension_count")) {
            None => head_dim,
            Some(_) => bounded("rope.dimension_count", MAX_DIM)?,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(f.error(format!(
                "rope.dimension_count {rope_dim} must be even and at most the head size {head_dim}"
            )));
        }
        let rope_theta = f.f64_key(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32;
        let rms_norm_eps = f
            .f64_key(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32;
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(f.error(format!("rope.freq_base {rope_theta} is invalid")));
        }
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(f.error(format!("layer_norm_rms_epsilon {rms_norm_eps} is invalid")));
        }
        let rope_scaling = if f.tensors.contains_key("rope_freqs.weight") {
            RopeScaling::FrequencyFactors
        } else {
            match f.str_key(&key("rope.scaling.type"))? {
                None | Some("none") => RopeScaling::None,
                Some("linear") => {
                    let factor = f.f64_key(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32;
                    if !(factor.is_finite() && factor > 0.0) {
                        return Err(f.error(format!("rope.scaling.factor {factor} is invalid")));
                    }
                    RopeScaling::Linear { factor }
                }
                Some(other) => {
                    return Err(f.error(format!(
                        "unsupported rope scaling `{other}` (supported: none, linear, llama3 frequency factors)"
                    )))
                }
            }
        };

        let embd = f
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| f.error("missing tensor `token_embd.weight`"))?;
        if embd.dims.len() != 2 || embd.dims[0] != hidden_size {
            return Err(f.error(format!(
                "tensor `token_embd.weight` has dims {:?}, expected [{hidden_size}, vocab]",
                embd.dims
            )));
        }
        let vocab_size = embd.dims[1];
        let tied_embeddings = !f.tensors.contains_key("output.weight");

        let config = Self {
            architecture,
            name: f.str_key("general.name")?.map(str::to_owned),
            context_length,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            vocab_size,
            tied_embeddings,
        };
        config.check_tensors(f)?;
        Ok(config)
    }

    /// Every tensor the decoder reads must exist with the shape the config implies, so a
    /// lying header is caught here rather than deep inside a matmul.
    fn check_tensors(&self, f: &GgufFile) -> Result<(), GgufError> {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let ff = self.intermediate_size;
        let mut expect: Vec<(String, Vec<usize>)> = vec![("output_norm.weight".into(), vec![h])];
        if !self.tied_embeddings {
            expect.push(("output.weight".into(), vec![h, self.vocab_size]));
        }
        for i in 0..self.num_layers {
            let p = format!("blk.{i}");
            expect.extend([
                (format!("{p}.attn_norm.weight"), vec![h]),
                (format!("{p}.attn_q.weight"), vec![h, q]),
                (format!("{p}.attn_k.weight"), vec![h, kv]),
                (format!("{p}.attn_v.weight"), vec![h, kv]),
                (format!("{p}.attn_output.weight"), vec![q, h]),
                (format!("{p}.ffn_norm.weight"), vec![h]),
                (format!("{p}.ffn_gate.weight"), vec![h, ff]),
                (format!("{p}.ffn_up.weight"), vec![h, ff]),
                (format!("{p}.ffn_down.weight"), vec![ff, h]),
            ]);
        }
        if self.rope_scaling == RopeScaling::FrequencyFactors {
            expect.push(("rope_freqs.weight".into(), vec![self.rope_dim / 2]));
        }
        for (name, dims) in expect {
            match f.tensors.get(&name) {
                None => return Err(f.error(format!("missing tensor `{name}`"))),
                Some(t) if t.dims != dims => {
                    return Err(f.error(format!(
                        "tensor `{name}` has dims {:?}, expected {dims:?}",
                        t.dims
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Number of weights in the decoder, for reports.
    pub fn parameter_count(&self, f: &GgufFile) -> usize {
        f.tensors.values().map(|t| t.element_count()).sum()
    }
}
