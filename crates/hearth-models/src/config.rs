//! The typed shape of a model, read from GGUF metadata or a Hugging Face `config.json`,
//! and checked against its tensors.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::gguf::{GgufError, GgufFile, TensorInfo};

/// Architectures whose decoder Hearth implements (GGUF names; Hugging Face `model_type`
/// `mistral` is read as `llama` with a sliding window).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// The decoder family: one decoder with switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, TinyLlama, Mistral.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: RMSNorm on each head of q and k.
    Qwen3,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
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
    /// Per-frequency divisors computed from a `config.json` (`rope_type: llama3`).
    Factors(Vec<f32>),
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
    /// q, k and v projections carry biases.
    pub attn_bias: bool,
    /// q and k are RMS-normalised per head before the rotation.
    pub qk_norm: bool,
    /// Each position attends to at most this many positions (itself included).
    pub sliding_window: Option<usize>,
    /// q/k weights rotate halves (`rotate_half`, GPT-NeoX style) rather than adjacent
    /// pairs: the loader reorders their rows so one rotation kernel serves both.
    pub rope_neox: bool,
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
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
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
            attn_bias: architecture == Architecture::Qwen2,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window: None,
            rope_neox: architecture != Architecture::Llama,
        };
        config.check_tensors(&f.tensors).map_err(|m| f.error(m))?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json` (`model_type` llama, mistral, qwen2, qwen3),
    /// checked against the folder's tensors. Errors are plain messages; the caller names
    /// the file.
    pub fn from_hf(c: &Value, tensors: &BTreeMap<String, TensorInfo>) -> Result<Self, String> {
        let model_type = c["model_type"].as_str().unwrap_or("");
        let architecture = match model_type {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "bert" => {
                return Err(
                    "model_type `bert` is a sentence-embedding model, not a text generator: serve it (`hearth serve -m DIR`) for /v1/embeddings"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "unsupported model_type `{other}` (supported: llama, mistral, qwen2, qwen3)"
                ))
            }
        };
        let int = |k: &str| -> Result<Option<usize>, String> {
            match &c[k] {
                Value::Null => Ok(None),
                v => match v.as_u64() {
                    Some(n) if n > 0 && n <= MAX_DIM.max(MAX_CONTEXT) => Ok(Some(n as usize)),
                    _ => Err(format!("`{k}` = {v} is not a positive integer in range")),
                },
            }
        };
        let need = |k: &str| int(k)?.ok_or_else(|| format!("`{k}` is missing"));
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let num_kv_heads = int("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match int("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads != 0 => {
                return Err(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} (and no head_dim is given)"
                ))
            }
            None => hidden_size / num_heads,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even"));
        }
        let act = c["hidden_act"].as_str().unwrap_or("silu");
        if act != "silu" {
            return Err(format!("hidden_act `{act}` is not supported (silu only)"));
        }
        if c["mlp_bias"].as_bool() == Some(true) {
            return Err("mlp_bias is not supported".into());
        }
        // transformers 5 keeps theta and scaling in `rope_parameters`.
        let params = &c["rope_parameters"];
        let rope_theta = params["rope_theta"]
            .as_f64()
            .or(c["rope_theta"].as_f64())
            .unwrap_or(10_000.0) as f32;
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(format!("rope_theta {rope_theta} is invalid"));
        }
        let scaling = if params.is_object() {
            params
        } else {
            &c["rope_scaling"]
        };
        let rope_type = scaling["rope_type"]
            .as_str()
            .or(scaling["type"].as_str())
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => {
                let factor = scaling["factor"].as_f64().unwrap_or(1.0) as f32;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(format!("rope scaling factor {factor} is invalid"));
                }
                RopeScaling::Linear { factor }
            }
            "llama3" => RopeScaling::Factors(llama3_factors(scaling, rope_theta, head_dim)?),
            other => {
                return Err(format!(
                    "rope scaling `{other}` is not supported (default, linear, llama3)"
                ))
            }
        };
        let sliding_window = match model_type {
            "mistral" => int("sliding_window")?,
            _ if c["use_sliding_window"].as_bool() == Some(true) => {
                return Err("use_sliding_window (per-layer windows) is not supported".into())
            }
            _ => None,
        };
        let embd = tensors
            .get("token_embd.weight")
            .ok_or("missing tensor `model.embed_tokens.weight`")?;
        let vocab_size = embd.dims.get(1).copied().unwrap_or(0);
        if int("vocab_size")?.is_some_and(|v| v != vocab_size) {
            return Err(format!(
                "vocab_size {} does not match the embedding matrix ({vocab_size} rows)",
                c["vocab_size"]
            ));
        }
        let rms_norm_eps = c["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(format!("rms_norm_eps {rms_norm_eps} is invalid"));
        }
        let config = Self {
            architecture,
            name: None,
            context_length: need("max_position_embeddings")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_dim: head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            vocab_size,
            tied_embeddings: !tensors.contains_key("output.weight"),
            attn_bias: architecture == Architecture::Qwen2
                || c["attention_bias"].as_bool() == Some(true),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            rope_neox: true,
        };
        config.check_tensors(tensors)?;
        Ok(config)
    }

    /// Every tensor the decoder reads must exist with the shape the config implies, so a
    /// lying header is caught here rather than deep inside a matmul.
    fn check_tensors(&self, tensors: &BTreeMap<String, TensorInfo>) -> Result<(), String> {
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
            if self.attn_bias {
                expect.extend([
                    (format!("{p}.attn_q.bias"), vec![q]),
                    (format!("{p}.attn_k.bias"), vec![kv]),
                    (format!("{p}.attn_v.bias"), vec![kv]),
                ]);
            }
            if self.qk_norm {
                expect.extend([
                    (format!("{p}.attn_q_norm.weight"), vec![self.head_dim]),
                    (format!("{p}.attn_k_norm.weight"), vec![self.head_dim]),
                ]);
            }
        }
        if self.rope_scaling == RopeScaling::FrequencyFactors {
            expect.push(("rope_freqs.weight".into(), vec![self.rope_dim / 2]));
        }
        for (name, dims) in expect {
            match tensors.get(&name) {
                None => return Err(format!("missing tensor `{name}`")),
                Some(t) if t.dims != dims => {
                    return Err(format!(
                        "tensor `{name}` has dims {:?}, expected {dims:?}",
                        t.dims
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Llama 3's per-frequency divisors: 1 for high frequencies, `factor` for low ones, a
/// smooth blend between (as transformers' `_compute_llama3_parameters`).
fn llama3_factors(s: &Value, theta: f32, head_dim: usize) -> Result<Vec<f32>, String> {
    let get = |k: &str| {
        s[k].as_f64()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("llama3 rope scaling needs a positive `{k}`"))
    };
    let factor = get("factor")?;
    let low = get("low_freq_factor")?;
    let high = get("high_freq_factor")?;
    let original = get("original_max_position_embeddings")?;
    if high <= low {
        return Err("llama3 rope scaling needs high_freq_factor > low_freq_factor".into());
    }
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The tensors a 1-layer llama of hidden 8, 2 heads of 4, ff 16, vocab 10 has.
    fn tensors(extra: &[(&str, Vec<usize>)]) -> BTreeMap<String, TensorInfo> {
        let mut t = BTreeMap::new();
        let mut add = |name: &str, dims: Vec<usize>| {
            t.insert(
                name.to_owned(),
                TensorInfo {
                    name: name.to_owned(),
                    dims,
                    dtype: crate::GgmlType::F32,
                    offset: 0,
                    size_bytes: 0,
                    shard: 0,
                },
            );
        };
        add("token_embd.weight", vec![8, 10]);
        add("output_norm.weight", vec![8]);
        for (n, d) in [
            ("attn_norm", vec![8]),
            ("attn_q", vec![8, 8]),
            ("attn_k", vec![8, 8]),
            ("attn_v", vec![8, 8]),
            ("attn_output", vec![8, 8]),
            ("ffn_norm", vec![8]),
            ("ffn_gate", vec![8, 16]),
            ("ffn_up", vec![8, 16]),
            ("ffn_down", vec![16, 8]),
        ] {
            add(&format!("blk.0.{n}.weight"), d);
        }
        for (n, d) in extra {
            add(n, d.clone());
        }
        t
    }

    fn config() -> Value {
        json!({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
               "intermediate_size": 16, "num_hidden_layers": 1, "max_position_embeddings": 64,
               "vocab_size": 10})
    }

    #[test]
    fn hf_configs_are_read_and_checked() {
        let c = ModelConfig::from_hf(&config(), &tensors(&[])).unwrap();
        assert_eq!(
            (c.head_dim, c.num_kv_heads, c.tied_embeddings, c.rope_neox),
            (4, 2, true, true)
        );
        assert_eq!(c.rope_theta, 10_000.0);
        let mut q2 = config();
        q2["model_type"] = json!("qwen2");
        let err = ModelConfig::from_hf(&q2, &tensors(&[])).unwrap_err();
        assert!(err.contains("blk.0.attn_q.bias"), "{err}");
        let biased = tensors(&[
            ("blk.0.attn_q.bias", vec![8]),
            ("blk.0.attn_k.bias", vec![8]),
            ("blk.0.attn_v.bias", vec![8]),
        ]);
        assert!(ModelConfig::from_hf(&q2, &biased).unwrap().attn_bias);
        let mut m = config();
        m["model_type"] = json!("mistral");
        m["sliding_window"] = json!(4);
        assert_eq!(
            ModelConfig::from_hf(&m, &tensors(&[]))
                .unwrap()
                .sliding_window,
            Some(4)
        );
        let mut l3 = config();
        l3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        let RopeScaling::Factors(f) = ModelConfig::from_hf(&l3, &tensors(&[]))
            .unwrap()
            .rope_scaling
        else {
            panic!("llama3 factors")
        };
        // (Checked against transformers end to end by the tiny Llama fixture.)
        assert_eq!(f.len(), 2);
        assert!(
            f.iter().all(|&x| (1.0..=8.0).contains(&x)) && f[1] >= f[0],
            "{f:?}"
        );
    }

    #[test]
    fn bad_hf_configs_say_what_is_wrong() {
        for (key, value, want) in [
            ("model_type", json!("gpt_neox"), "unsupported model_type"),
            ("model_type", json!("bert"), "/v1/embeddings"),
            ("num_attention_heads", json!(0), "positive integer"),
            ("num_attention_heads", json!(3), "divisible"),
            ("num_key_value_heads", json!(3), "multiple"),
            ("hidden_size", json!(-8), "positive integer"),
            ("hidden_size", json!(1e30), "positive integer"),
            ("max_position_embeddings", Value::Null, "missing"),
            ("hidden_act", json!("gelu"), "silu"),
            ("mlp_bias", json!(true), "mlp_bias"),
            ("rope_theta", json!(0.5), "rope_theta"),
            ("rms_norm_eps", json!(2.0), "rms_norm_eps"),
            ("vocab_size", json!(11), "vocab_size"),
            ("rope_scaling", json!({"rope_type": "yarn"}), "yarn"),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
                "low_freq_factor",
            ),
            ("use_sliding_window", json!(true), "use_sliding_window"),
        ] {
            let mut c = config();
            if key == "use_sliding_window" {
                c["model_type"] = json!("qwen3");
            }
            c[key] = value;
            let err = ModelConfig::from_hf(&c, &tensors(&[])).unwrap_err();
            assert!(err.contains(want), "{key}: {err}");
        }
    }
}
