//! Pinned model hashes (`--sha256`, manifests, the hash cache, `hearth models verify`) and
//! the bill of materials (`hearth models bom`, validated against the CycloneDX 1.6
//! schema committed under tests/data/cyclonedx by scripts/fetch-cyclonedx-schema).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn model() -> PathBuf {
    let m = common::root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(m.is_file(), "run scripts/fetch-default-model");
    m
}

fn hearth(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("HEARTH_CACHE_DIR", cache)
        .env("HEARTH_LOG", "info")
        .env_remove("HEARTH_MODEL_SHA256")
        .output()
        .expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The CycloneDX 1.6 validator, its references (SPDX ids, JSF) served from the committed
/// files: nothing is fetched.
fn cyclonedx_validator() -> jsonschema::Validator {
    struct Local;
    impl jsonschema::Retrieve for Local {
        fn retrieve(
            &self,
            uri: &jsonschema::Uri<String>,
        ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
            let name = uri.as_str().rsplit('/').next().unwrap_or_default();
            let path = common::root().join("tests/data/cyclonedx").join(name);
            Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
        }
    }
    let schema: Value = serde_json::from_slice(
        &std::fs::read(common::root().join("tests/data/cyclonedx/bom-1.6.SNAPSHOT.schema.json"))
            .unwrap(),
    )
    .unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .with_retriever(Local)
        .build(&schema)
        .expect("the CycloneDX schema compiles")
}

fn errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn bom_is_valid_cyclonedx_1_6_and_describes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("bom.json");
    let out = hearth(
        dir.path(),
        &["models", "bom", "-o", out_path.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bom: Value = serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    let validator = cyclonedx_validator();
    let errs = errors(&validator, &bom);
    assert!(errs.is_empty(), "{errs:#?}");

    assert_eq!(bom["specVersion"], "1.6");
    let models = bom["components"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m["type"], "machine-learning-model");
    assert_eq!(m["name"], "smollm2-135m-instruct");
    assert_eq!(m["hashes"][0]["content"], SHA);
    assert_eq!(m["licenses"][0]["license"]["id"], "Apache-2.0");
    assert_eq!(m["supplier"]["name"], "HuggingFaceTB");
    assert_eq!(
        m["modelCard"]["modelParameters"]["architectureFamily"],
        "llama"
    );
    let prop = |name: &str| {
        m["properties"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(prop("hearth:parameters").as_deref(), Some("134515008"));
    assert_eq!(prop("hearth:quantization").as_deref(), Some("Q4_1"));
    assert_eq!(prop("hearth:pinned").as_deref(), Some("true"));
    assert!(m["externalReferences"][0]["url"]
        .as_str()
        .unwrap()
        .contains("HuggingFaceTB/SmolLM2-135M-Instruct"));
    let file = &m["components"][0];
    assert_eq!(file["type"], "file");
    assert_eq!(file["name"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(file["hashes"][0]["content"], SHA);

    // The validator is not a rubber stamp: a wrong hash algorithm name, a bad
    // component type and a missing bomFormat are each caught.
    for (path, bad) in [
        ("/components/0/hashes/0/alg", Value::from("sha256")),
        ("/components/0/type", Value::from("model")),
        (
            "/components/0/licenses/0/license/id",
            Value::from("Apache-2"),
        ),
    ] {
        let mut broken = bom.clone();
        *broken.pointer_mut(path).unwrap() = bad;
        assert!(!errors(&validator, &broken).is_empty(), "{path}");
    }
    let mut broken = bom.clone();
    broken.as_object_mut().unwrap().remove("bomFormat");
    assert!(!errors(&validator, &broken).is_empty());

    // To stdout, the same shape; two BOMs have different serial numbers.
    let out = hearth(
        dir.path(),
        &["models", "bom", "-m", model().to_str().unwrap()],
    );
    assert!(out.status.success());
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(errors(&validator, &again).is_empty());
    assert_ne!(again["serialNumber"], bom["serialNumber"]);
}

#[test]
fn bom_of_folders_is_valid_too() {
    let dir = tempfile::tempdir().unwrap();
    let minilm = common::root().join("models/all-MiniLM-L6-v2");
    assert!(minilm.is_dir(), "run scripts/fetch-embedding-model");
    let qwen = common::root().join("tests/fixtures/tiny/qwen2");
    let out = hearth(
        dir.path(),
        &[
            "models",
            "bom",
            "-m",
            minilm.to_str().unwrap(),
            "-m",
            qwen.to_str().unwrap(),
            "-m",
            model().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bom: Value = serde_json::from_slice(&out.stdout).unwrap();
    let errs = errors(&cyclonedx_validator(), &bom);
    assert!(errs.is_empty(), "{errs:#?}");
    let c = bom["components"].as_array().unwrap();
    assert_eq!(c.len(), 3);
    let m = &c[0];
    assert_eq!(m["name"], "all-MiniLM-L6-v2");
    assert_eq!(
        m["licenses"][0]["license"]["id"], "Apache-2.0",
        "from the model card"
    );
    assert_eq!(
        m["modelCard"]["modelParameters"]["task"],
        "feature-extraction"
    );
    let files: Vec<&str> = m["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"model.safetensors") && files.contains(&"1_Pooling/config.json"),
        "{files:?}"
    );
    let params = m["properties"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hearth:parameters")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!((22_000_000..23_000_000).contains(&params), "{params}");
    assert_eq!(
        c[1]["modelCard"]["modelParameters"]["architectureFamily"],
        "qwen2"
    );
}

#[test]
fn pins_refuse_a_changed_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(model(), &copy).unwrap();
    let copy_s = copy.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "-m",
            copy_s,
            "-n",
            "2",
            "--temperature",
            "0",
            "-t",
            "2",
        ];
        args.extend_from_slice(extra);
        args.push("Hi");
        hearth(&cache, &args)
    };

    // Unpinned: loads with a warning, or is refused with --require-pin.
    let out = run(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not pinned"));
    let out = run(&["--require-pin"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--require-pin"),
        "{}",
        text(&out.stderr)
    );

    // Pinned by a manifest beside it: read once, then from the cache.
    std::fs::write(
        dir.path().join("manifest.toml"),
        format!("[[model]]\nname = \"copy\"\nfile = \"copy.gguf\"\nsha256 = \"{SHA}\"\nlicense = \"Apache-2.0\"\n"),
    )
    .unwrap();
    let out = run(&["--require-pin"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cached=false"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&[]);
    assert!(
        text(&out.stderr).contains("cached=true"),
        "{}",
        text(&out.stderr)
    );
    let out = hearth(&cache, &["models", "verify", "-m", copy_s]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).starts_with("OK "),
        "{}",
        text(&out.stdout)
    );

    // One byte of the weights changed: every path refuses it, naming both hashes.
    let mut bytes = std::fs::read(&copy).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x40;
    std::fs::write(&copy, &bytes).unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("mismatch") && err.contains(SHA) && err.contains("copy.gguf"),
        "{err}"
    );
    let out = hearth(&cache, &["models", "verify", "-m", copy_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("MISMATCH"),
        "{}",
        text(&out.stdout)
    );
    let out = hearth(&cache, &["models", "bom", "-m", copy_s]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no BOM for a file that fails its pin"
    );

    // `serve --sha256` with the wrong hash: /health answers while it checks, then it
    // exits 1 naming both hashes.
    let wrong = "0".repeat(64);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--port", "0", "-m"])
        .arg(model())
        .args(["--sha256", &wrong])
        .env("HEARTH_CACHE_DIR", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "serve did not refuse"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains(&wrong) && err.contains(SHA) && err.contains("--sha256"),
        "{err}"
    );
    // A malformed pin is a usage error before anything loads.
    let out = hearth(&cache, &["run", "-m", copy_s, "--sha256", "abc", "Hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a SHA-256"));
}
