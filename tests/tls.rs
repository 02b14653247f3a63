//! HTTPS with rustls: a self-signed certificate made in the test, a client that trusts
//! only it, the real model behind.

mod common;

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTPS request (`Connection: close`): status line and the whole response.
async fn https(
    connector: &tokio_rustls::TlsConnector,
    authority: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    // rustls reports a peer that closes without close_notify as an error; the bytes
    // read before it count.
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

#[test]
fn https_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();

    let model = common::root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
    cmd.args(["serve", "--port", "0", "-t", "2", "-m"])
        .arg(&model)
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .env_remove("HEARTH_API_KEYS");
    let (child, authority) = common::spawn_listening(&mut cmd, "https");
    let _server = Killed(child);

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(generated.cert.der().to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let start = Instant::now();
        loop {
            let (status, _) = https(&connector, &authority, "GET", "/ready", None)
                .await
                .unwrap();
            if status == 200 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let body = json!({
            "messages": [{"role": "user", "content": "What is 2+2?"}],
            "max_tokens": 8,
            "temperature": 0,
        })
        .to_string();
        let (status, text) = https(
            &connector,
            &authority,
            "POST",
            "/v1/chat/completions",
            Some(&body),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{text}");
        let json_start = text.find("\r\n\r\n").unwrap() + 4;
        let v: Value = serde_json::from_str(&text[json_start..]).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["usage"]["completion_tokens"], 8);

        // A client that does not trust the certificate cannot connect.
        let untrusting = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let other = tokio_rustls::TlsConnector::from(Arc::new(untrusting));
        let err = https(&other, &authority, "GET", "/health", None).await;
        assert!(err.is_err(), "{err:?}");

        // Plain HTTP on the TLS port gets no HTTP answer.
        let mut tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut out)).await;
        assert!(!String::from_utf8_lossy(&out).contains("200 OK"));

        // The server still serves.
        let (status, _) = https(&connector, &authority, "GET", "/health", None)
            .await
            .unwrap();
        assert_eq!(status, 200);
    });
}

#[test]
fn bad_certificate_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let mismatched = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let run = |cert: &std::path::Path, key: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["serve", "--port", "0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8(out.stderr).unwrap()
    };
    let err = run(&cert, &key);
    assert!(
        err.contains("cert.pem") && err.contains("CERTIFICATE"),
        "{err}"
    );
    std::fs::write(&cert, other.cert.pem()).unwrap();
    let err = run(&cert, &key);
    assert!(
        err.contains("key.pem") && err.contains("private key"),
        "{err}"
    );
    std::fs::write(&key, mismatched.signing_key.serialize_pem()).unwrap();
    let err = run(&cert, &key);
    assert!(err.contains("does not fit"), "{err}");
    let err = run(&dir.path().join("none.pem"), &key);
    assert!(err.contains("none.pem"), "{err}");
    // One without the other is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--tls-cert"])
        .arg(&cert)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
