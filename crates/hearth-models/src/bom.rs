//! A bill of materials for served models: CycloneDX 1.6 JSON (ML-BOM). Each model is a
//! `machine-learning-model` component (name, architecture, parameter count,
//! quantization, license, origin, its model card's parameters) with its files as `file`
//! components carrying their SHA-256. What the BOM says comes from the GGUF metadata and
//! the manifest entry; nothing is fetched.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::gguf::{GgufError, GgufFile};
use crate::locate::ManifestEntry;

/// One model to describe.
#[derive(Clone, Debug)]
pub struct BomModel {
    /// The model's name (its manifest name, or the file's stem).
    pub name: String,
    /// A GGUF file, or a Hugging Face folder.
    pub path: PathBuf,
    /// Each file with its SHA-256 (verified against its pin when it has one): the GGUF
    /// file, or every file of the folder (relative paths).
    pub files: Vec<(PathBuf, String)>,
    /// Where the pin came from, if the model is pinned.
    pub pinned_by: Option<String>,
    pub manifest: Option<ManifestEntry>,
}

/// GGUF `general.file_type` values (llama.cpp's `llama_ftype`) as names.
fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// SPDX ids for the licenses models commonly declare (GGUF writes them in lower case).
const SPDX: &[&str] = &[
    "Apache-2.0",
    "MIT",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "CC-BY-4.0",
    "CC-BY-SA-4.0",
    "CC-BY-NC-4.0",
    "CC-BY-NC-SA-4.0",
    "CC0-1.0",
    "GPL-3.0-only",
    "LGPL-3.0-only",
    "AGPL-3.0-only",
    "MPL-2.0",
    "OpenRAIL",
    "Unlicense",
];

fn license(text: &str) -> Value {
    match SPDX.iter().find(|id| id.eq_ignore_ascii_case(text.trim())) {
        Some(id) => json!({"license": {"id": id}}),
        None => json!({"license": {"name": text.trim()}}),
    }
}

fn prop(name: &str, value: impl ToString) -> Value {
    json!({"name": format!("hearth:{name}"), "value": value.to_string()})
}

/// A random (version 4) UUID.
fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    // Without randomness the serial number is still well-formed (all zero but version).
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::pin::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The `file` components of a model.
fn file_components(m: &BomModel) -> Vec<Value> {
    m.files
        .iter()
        .map(|(rel, sha)| {
            let full = if m.path.is_dir() {
                m.path.join(rel)
            } else {
                m.path.clone()
            };
            let size = std::fs::metadata(&full).map_or(0, |md| md.len());
            json!({
                "type": "file",
                "bom-ref": format!("file:{}:{}", m.name, rel.display()),
                "name": rel.display().to_string(),
                "hashes": [{"alg": "SHA-256", "content": sha}],
                "properties": [prop("size_bytes", size), prop("path", full.display())],
            })
        })
        .collect()
}

/// The component describing a Hugging Face folder model, from its config.json and the
/// headers of its safetensors.
fn folder_component(m: &BomModel) -> Result<Value, crate::hf::HfError> {
    let config = crate::hf::read_json(&m.path.join("config.json"))?;
    let arch = config["architectures"][0]
        .as_str()
        .or(config["model_type"].as_str())
        .unwrap_or("unknown")
        .to_owned();
    let (parameters, types) = crate::hf::parameter_summary(&m.path)?;
    let tensor_types: Vec<String> = types.iter().map(|(k, n)| format!("{k}×{n}")).collect();
    let embedding = config["model_type"].as_str() == Some("bert");
    let entry = m.manifest.as_ref();
    // A model card's YAML front matter names the license (`license: apache-2.0`).
    let card_license = std::fs::read_to_string(m.path.join("README.md"))
        .ok()
        .and_then(|t| {
            let front = t.strip_prefix("---")?.split("\n---").next()?.to_owned();
            front
                .lines()
                .find_map(|l| l.strip_prefix("license:").map(|v| v.trim().to_owned()))
        });
    let mut properties = vec![
        prop("architecture", &arch),
        prop("parameters", parameters),
        prop("tensor_types", tensor_types.join(", ")),
        prop("format", "Hugging Face folder (safetensors)"),
        prop("pinned", m.pinned_by.is_some()),
    ];
    if let Some(p) = &m.pinned_by {
        properties.push(prop("pinned_by", p));
    }
    if let Some(c) = config["max_position_embeddings"].as_u64() {
        properties.push(prop("context_length", c));
    }
    if let Some(src) = entry.and_then(|e| e.source.clone()) {
        properties.push(prop("source", src));
    }
    let mut c = json!({
        "type": "machine-learning-model",
        "bom-ref": format!("model:{}", m.name),
        "name": m.name,
        "description": config["_name_or_path"].as_str().unwrap_or(&m.name),
        "properties": properties,
        "modelCard": {
            "modelParameters": {
                "task": if embedding { "feature-extraction" } else { "text-generation" },
                "architectureFamily": config["model_type"].as_str().unwrap_or("unknown"),
                "modelArchitecture": arch,
                "inputs": [{"format": "text"}],
                "outputs": [{"format": if embedding { "vector" } else { "text" }}],
            },
        },
        "components": file_components(m),
    });
    if let Some(l) = entry.and_then(|e| e.license.clone()).or(card_license) {
        c["licenses"] = json!([license(&l)]);
    }
    if let Some(url) = entry
        .and_then(|e| e.origin.clone())
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
    {
        c["externalReferences"] =
            json!([{"type": "website", "url": url, "comment": "where the model is published"}]);
    }
    Ok(c)
}

/// Why a model could not be described.
#[derive(Debug, thiserror::Error)]
pub enum BomError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Hf(#[from] crate::hf::HfError),
}

/// The component describing one model.
fn model_component(m: &BomModel) -> Result<Value, BomError> {
    if m.path.is_dir() {
        return Ok(folder_component(m)?);
    }
    let gguf = GgufFile::open(&m.path)?;
    let s = |k: &str| gguf.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let arch = s("general.architecture").unwrap_or_else(|| "unknown".into());
    let parameters: u64 = gguf
        .tensors
        .values()
        .map(|t| t.element_count() as u64)
        .sum();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in gguf.tensors.values() {
        *types.entry(format!("{:?}", t.dtype)).or_default() += 1;
    }
    let tensor_types: Vec<String> = types.iter().map(|(k, n)| format!("{k}×{n}")).collect();
    let quantization = gguf
        .get("general.file_type")
        .and_then(|v| v.as_u64())
        .and_then(file_type_name)
        .map(str::to_owned)
        .unwrap_or_else(|| tensor_types.join(", "));
    let ctx = gguf
        .get(&format!("{arch}.context_length"))
        .and_then(|v| v.as_u64());
    let entry = m.manifest.as_ref();
    let license_text = entry
        .and_then(|e| e.license.clone())
        .or_else(|| s("general.license"));
    let origin = entry
        .and_then(|e| e.origin.clone())
        .or_else(|| s("general.source.url"))
        .or_else(|| {
            s("general.source.huggingface.repository")
                .map(|r| format!("https://huggingface.co/{r}"))
        });
    let sha = m.files.first().map(|(_, s)| s.clone()).unwrap_or_default();
    let hashes = json!([{"alg": "SHA-256", "content": sha}]);
    let mut properties = vec![
        prop("architecture", &arch),
        prop("parameters", parameters),
        prop("quantization", &quantization),
        prop("tensor_types", tensor_types.join(", ")),
        prop("format", format!("GGUF v{}", gguf.version)),
        prop("pinned", m.pinned_by.is_some()),
    ];
    if let Some(p) = &m.pinned_by {
        properties.push(prop("pinned_by", p));
    }
    if let Some(c) = ctx {
        properties.push(prop("context_length", c));
    }
    if let Some(src) = entry.and_then(|e| e.source.clone()) {
        properties.push(prop("source", src));
    }
    for key in [
        "general.name",
        "general.basename",
        "general.finetune",
        "general.size_label",
        "general.quantized_by",
    ] {
        if let Some(v) = s(key) {
            properties.push(json!({"name": format!("gguf:{key}"), "value": v}));
        }
    }
    let mut c = json!({
        "type": "machine-learning-model",
        "bom-ref": format!("model:{}", m.name),
        "name": m.name,
        "description": s("general.name").unwrap_or_else(|| m.name.clone()),
        "hashes": hashes,
        "properties": properties,
        "modelCard": {
            "modelParameters": {
                "task": "text-generation",
                "architectureFamily": arch,
                "modelArchitecture": format!("{arch} decoder, {} parameters, {quantization}", parameters),
                "inputs": [{"format": "text"}],
                "outputs": [{"format": "text"}],
            },
        },
        "components": file_components(m),
    });
    if let Some(v) = s("general.version") {
        c["version"] = v.into();
    }
    if let Some(org) = s("general.organization") {
        c["supplier"] = json!({"name": org});
    }
    if let Some(l) = license_text {
        c["licenses"] = json!([license(&l)]);
    }
    if let Some(url) = origin.filter(|u| u.starts_with("https://") || u.starts_with("http://")) {
        c["externalReferences"] =
            json!([{"type": "website", "url": url, "comment": "where the model is published"}]);
    }
    Ok(c)
}

/// The CycloneDX 1.6 document for `models`, served by `hearth` `version`.
pub fn cyclonedx(models: &[BomModel], version: &str, now: SystemTime) -> Result<Value, BomError> {
    let components = models
        .iter()
        .map(model_component)
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<String> = models.iter().map(|m| format!("model:{}", m.name)).collect();
    Ok(json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": format!("urn:uuid:{}", uuid_v4()),
        "version": 1,
        "metadata": {
            "timestamp": crate::clock::rfc3339_seconds(now),
            "tools": {"components": [{"type": "application", "name": "hearth", "version": version}]},
            "component": {
                "type": "application",
                "bom-ref": "hearth",
                "name": "hearth",
                "version": version,
                "description": "Local inference server: the models below are what it serves",
            },
        },
        "components": components,
        "dependencies": [{"ref": "hearth", "dependsOn": refs}],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        assert_ne!(u, uuid_v4());
    }

    #[test]
    fn licenses_map_to_spdx_where_they_can() {
        assert_eq!(
            license("apache-2.0"),
            json!({"license": {"id": "Apache-2.0"}})
        );
        assert_eq!(license("llama3"), json!({"license": {"name": "llama3"}}));
    }
}
