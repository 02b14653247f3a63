//! Hugging Face model folders: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` (its
//! `chat_template`, or a `chat_template.jinja` beside it) and `generation_config.json`.
//!
//! Shards are memory-mapped; tensors keep their dtype (f32, f16, bf16) and are known by
//! the GGUF names the engine uses, so one decoder reads both formats. Every offset in a
//! header is checked against its file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::gguf::{GgmlType, TensorInfo};

/// A model folder's weights: the mapped shards and the tensor directory (GGUF names).
pub struct SafetensorsSet {
    dir: PathBuf,
    shards: Vec<Mmap>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for SafetensorsSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSet")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// An error about a file of a model folder, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct HfError {
    pub path: PathBuf,
    pub message: String,
}

pub(crate) fn err(path: &Path, message: impl Into<String>) -> HfError {
    HfError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads a JSON file of the folder.
pub fn read_json(path: &Path) -> Result<Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

/// Reads an optional JSON file of the folder: `Null` when it is not there.
pub fn read_json_if_present(path: &Path) -> Result<Value, HfError> {
    if path.is_file() {
        read_json(path)
    } else {
        Ok(Value::Null)
    }
}

/// The GGUF name of a Hugging Face tensor name, for the tensors the decoder reads.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

impl SafetensorsSet {
    /// Maps the folder's safetensors: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` names.
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let v = read_json(&index)?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| err(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = Vec::new();
            for f in map.values() {
                let f = f
                    .as_str()
                    .ok_or_else(|| err(&index, "`weight_map` values must be file names"))?;
                if Path::new(f).components().count() != 1 {
                    return Err(err(
                        &index,
                        format!("shard `{f}` is not a file in the folder"),
                    ));
                }
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_owned());
                }
            }
            names.sort();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (shard, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
            // Safety: the map is read-only; like every mmap reader we rely on the file
            // not being truncated while it is served (models are read-only assets).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| err(path, e.to_string()))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let Some(gguf) = gguf_name(&name) else {
                    continue;
                };
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(err(
                            path,
                            format!(
                                "tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16"
                            ),
                        ))
                    }
                };
                let (begin, end) = info.data_offsets;
                let elements: usize = info.shape.iter().product();
                let bytes = elements * if dtype == GgmlType::F32 { 4 } else { 2 };
                if end - begin != bytes || base + end > map.len() {
                    return Err(err(
                        path,
                        format!("tensor `{name}`: its data does not fit its shape"),
                    ));
                }
                if info.shape.is_empty() || info.shape.len() > 2 {
                    return Err(err(
                        path,
                        format!("tensor `{name}` has shape {:?}", info.shape),
                    ));
                }
                if tensors.contains_key(&gguf) {
                    return Err(err(path, format!("tensor `{name}` appears twice")));
                }
                tensors.insert(
                    gguf.clone(),
                    TensorInfo {
                        name: gguf,
                        // GGUF order: innermost first.
                        dims: info.shape.iter().rev().copied().collect(),
                        dtype,
                        offset: base + begin,
                        size_bytes: bytes,
                        shard,
                    },
                );
            }
            shards.push(map);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }

    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.shards[info.shard][info.offset..info.offset + info.size_bytes]
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of all shards.
    pub fn total_bytes(&self) -> usize {
        self.shards.iter().map(|m| m.len()).sum()
    }
}

/// Parameter count and tensors per dtype over every safetensors file of a folder (all
/// tensors, not only those the decoder reads).
pub fn parameter_summary(dir: &Path) -> Result<(u64, BTreeMap<String, usize>), HfError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let (mut params, mut types) = (0u64, BTreeMap::new());
    for path in files {
        let file = std::fs::File::open(&path).map_err(|e| err(&path, e.to_string()))?;
        // Safety: read-only map of a model file.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(&path, e.to_string()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| err(&path, format!("not a safetensors file: {e}")))?;
        for info in meta.tensors().values() {
            params += info.shape.iter().product::<usize>() as u64;
            *types.entry(format!("{:?}", info.dtype)).or_default() += 1;
        }
    }
    Ok((params, types))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_read_like_one_file() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/qwen2");
        let whole = SafetensorsSet::open(&fixture).unwrap();
        // Split the fixture's tensors over two shards with an index, as large models come.
        let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut all = st.tensors();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let dir = tempfile::tempdir().unwrap();
        let mut map = serde_json::Map::new();
        let half = all.len() / 2;
        for (i, part) in [&all[..half], &all[half..]].into_iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i + 1);
            let data =
                safetensors::serialize(part.iter().map(|(n, v)| (n.clone(), v)), None).unwrap();
            std::fs::write(dir.path().join(&file), data).unwrap();
            for (n, _) in part {
                map.insert(n.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let sharded = SafetensorsSet::open(dir.path()).unwrap();
        assert_eq!(sharded.shards.len(), 2);
        assert_eq!(sharded.tensors.len(), whole.tensors.len());
        for (name, info) in &whole.tensors {
            let other = &sharded.tensors[name];
            assert_eq!(
                (&other.dims, other.dtype),
                (&info.dims, info.dtype),
                "{name}"
            );
            assert_eq!(
                sharded.tensor_data(other),
                whole.tensor_data(info),
                "{name}"
            );
        }
        // An index naming a shard outside the folder is refused.
        let bad = serde_json::json!({"weight_map": {"x": "../evil.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            bad.to_string(),
        )
        .unwrap();
        let err = SafetensorsSet::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a file in the folder"), "{err}");
        // A truncated shard is named.
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let shard = dir.path().join("model-00001-of-00002.safetensors");
        let data = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &data[..data.len() - 10]).unwrap();
        let err = SafetensorsSet::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias").as_deref(),
            Some("blk.3.attn_q.bias")
        );
        assert_eq!(
            gguf_name("model.layers.10.mlp.down_proj.weight").as_deref(),
            Some("blk.10.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(gguf_name("model.rotary_emb.inv_freq"), None);
    }
}
