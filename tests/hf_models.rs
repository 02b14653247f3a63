//! Models from Hugging Face folders and the local Hugging Face cache, end to end: the
//! tiny fixtures of tests/fixtures/tiny (scripts/gen-tiny-models) through `hearth run`
//! and `hearth serve`; `org/name[@revision]` resolved offline; folder pins; clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Server;
use serde_json::{json, Value};

fn tiny(family: &str) -> PathBuf {
    common::root().join("tests/fixtures/tiny").join(family)
}

fn hearth(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
    cmd.args(args)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .env_remove("HEARTH_MODEL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A copy of a fixture folder (model files only).
fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".gguf") || name == "golden.json" {
            continue;
        }
        std::fs::copy(&f, to.join(&name)).unwrap();
    }
}

fn run_greedy(env: &[(&str, &Path)], model: &str) -> Output {
    hearth(
        env,
        &[
            "run",
            "-m",
            model,
            "-n",
            "6",
            "--temperature",
            "0",
            "-t",
            "2",
            "The hearth",
        ],
    )
}

#[test]
fn every_family_runs_from_its_folder() {
    for family in ["llama", "mistral", "qwen2", "qwen3"] {
        let out = run_greedy(&[], tiny(family).to_str().unwrap());
        assert!(out.status.success(), "{family}: {}", text(&out.stderr));
        assert!(!out.stdout.is_empty(), "{family} generated nothing");
    }
    // GGUF and safetensors of the same model generate the same text.
    let a = run_greedy(&[], tiny("qwen3").to_str().unwrap());
    let b = run_greedy(&[], tiny("qwen3").join("tiny-qwen3.gguf").to_str().unwrap());
    assert_eq!(text(&a.stdout), text(&b.stdout));
}

#[test]
fn the_local_hugging_face_cache_never_the_network() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--hearth-test--tiny-qwen2");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_model(&tiny("qwen2"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let env = [("HF_HUB_CACHE", cache.path())];
    let want = run_greedy(&[], tiny("qwen2").to_str().unwrap());
    for id in [
        "hearth-test/tiny-qwen2",
        &format!("hearth-test/tiny-qwen2@{commit}"),
    ] {
        let out = run_greedy(&env, id);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        assert_eq!(out.stdout, want.stdout, "{id}");
    }
    // HF_HOME/hub is the other place.
    let home = tempfile::tempdir().unwrap();
    let hub_repo = home.path().join("hub/models--hearth-test--tiny-qwen2");
    copy_model(&tiny("qwen2"), &hub_repo.join("snapshots").join(commit));
    std::fs::create_dir_all(hub_repo.join("refs")).unwrap();
    std::fs::write(hub_repo.join("refs/main"), commit).unwrap();
    let out = run_greedy(&[("HF_HOME", home.path())], "hearth-test/tiny-qwen2");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Absent: the error says where it looked and how to bring the model in.
    let out = run_greedy(&[("HF_HOME", home.path())], "hearth-test/absent");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("not in the local Hugging Face cache")
            && err.contains(
                &home
                    .path()
                    .join("hub/models--hearth-test--absent")
                    .display()
                    .to_string()
            )
            && err.contains("never downloads"),
        "{err}"
    );
}

#[test]
fn serve_a_folder_over_http() {
    let dir = tiny("llama");
    let server = Server::start(&["-m", dir.to_str().unwrap(), "--kv-cache-dtype", "f32"]);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "llama");
    let body = json!({
        "messages": [{"role": "user", "content": "Queries and keys"}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &stream);
    let streamed = common::streamed_content(&events);
    assert_eq!(
        streamed,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[test]
fn folders_are_pinned_by_their_manifest_and_bad_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen3");
    copy_model(&tiny("qwen3"), &dir);
    let sha = |f: &str| {
        let out = Command::new("sha256sum").arg(dir.join(f)).output().unwrap();
        text(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let manifest: String = ["model.safetensors", "tokenizer.json", "config.json"]
        .iter()
        .map(|f| {
            format!(
                "[[model]]\nname = \"{f}\"\nfile = \"{f}\"\nsha256 = \"{}\"\n\n",
                sha(f)
            )
        })
        .collect();
    std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
    let cache = tmp.path().join("cache");
    let env = [("HEARTH_CACHE_DIR", cache.as_path())];
    let d = dir.to_str().unwrap();
    let zeros = "0".repeat(64);
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a = vec!["run", "-m", d, "-n", "2", "--temperature", "0", "-t", "2"];
        a.extend_from_slice(extra);
        a.push("Hi");
        a.into_iter().map(String::from).collect()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        hearth(&env, &a)
    };
    let out = run(args(&["--require-pin"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut with_sha = args(&[]);
    with_sha.insert(1, zeros.clone());
    with_sha.insert(1, "--sha256".into());
    let out = run(with_sha);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("pins one file"));
    // A changed tokenizer is caught like changed weights.
    let tok = dir.join("tokenizer.json");
    let changed = std::fs::read_to_string(&tok).unwrap() + " ";
    std::fs::write(&tok, changed).unwrap();
    let out = run(args(&[]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("mismatch"),
        "{err}"
    );

    // Not a model folder; an architecture we do not have; a weight missing.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = hearth(&[], &["run", "-m", empty.to_str().unwrap(), "Hi"]);
    assert!(
        text(&out.stderr).contains("no config.json"),
        "{}",
        text(&out.stderr)
    );
    let other = tmp.path().join("other");
    copy_model(&tiny("qwen2"), &other);
    let cfg_path = other.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = json!("gemma2");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = hearth(&[], &["run", "-m", other.to_str().unwrap(), "Hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("gemma2") && err.contains("qwen3"),
        "{err}"
    );
    cfg["model_type"] = json!("qwen2");
    cfg["num_hidden_layers"] = json!(3);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = hearth(&[], &["run", "-m", other.to_str().unwrap(), "Hi"]);
    assert!(text(&out.stderr).contains("blk.2"), "{}", text(&out.stderr));
    // Garbage in the weights, the tokenizer or the config: one line naming the file.
    cfg["num_hidden_layers"] = json!(2);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    for (file, garbage) in [
        ("tokenizer.json", &b"{\"model\": 7"[..]),
        ("config.json", &b"\xff\xfe not json"[..]),
        (
            "model.safetensors",
            &b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"[..],
        ),
    ] {
        let path = other.join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, garbage).unwrap();
        let out = hearth(&[], &["run", "-m", other.to_str().unwrap(), "Hi"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(
            err.contains(file) && err.lines().count() == 1,
            "{file}: {err}"
        );
        std::fs::write(&path, good).unwrap();
    }
}
