//! Nothing leaves the machine. Two proofs, each over a full request cycle with the real
//! model (models, chat whole and streamed, completions, metrics, shutdown):
//! - under `strace -f`, every socket the server opens, binds, connects or sends to is
//!   loopback (or a Unix socket);
//! - in a network namespace that has only a loopback interface (`unshare -rn`), the
//!   server starts, answers and shuts down as usual.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{chat, Server};
use serde_json::json;

/// The request cycle both proofs run.
fn full_cycle(server: &Server) {
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/v1/models").0, 200);
    let (status, v) = server.post("/v1/chat/completions", &chat("Say hi.", 8));
    assert_eq!(status, 200, "{v}");
    let mut body = chat("Count to three.", 8);
    body["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (status, _) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200);
    assert_eq!(server.get("/metrics").0, 200);
}

/// Whether a socket address as strace prints it is loopback or local.
fn local(call: &str) -> bool {
    if call.contains("sa_family=AF_UNIX") || call.contains("sa_family=AF_NETLINK") {
        return true;
    }
    if call.contains("sa_family=AF_INET6") {
        return call.contains("inet_pton(AF_INET6, \"::1\"")
            || call.contains("inet_pton(AF_INET6, \"::ffff:127.");
    }
    if call.contains("sa_family=AF_INET") {
        return call.contains("inet_addr(\"127.");
    }
    // No address (a connected socket's send): nothing new is reached.
    !call.contains("sa_family=")
}

#[test]
fn strace_sees_only_loopback_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let model = common::root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "run scripts/fetch-default-model");
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "strace is needed (scripts/test installs it)"
    );
    let mut strace = Command::new("strace");
    strace
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=socket,bind,connect,accept,accept4,sendto,sendmsg",
            "-o",
        ])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--port", "0", "-t", "2", "-m"])
        .arg(&model)
        .env_remove("HEARTH_API_KEYS");
    let (child, authority) = common::spawn_listening(&mut strace, "http");
    // The harness's Server kills on drop; here the server is strace's child.
    let server = Server { child, authority };
    let start = Instant::now();
    while server.get("/ready").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
    full_cycle(&server);
    // SIGTERM to hearth itself (strace's child), then strace ends with it.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", server.child.id())).unwrap();
    let hearth_pid = children
        .split_whitespace()
        .next()
        .expect("hearth runs under strace");
    assert!(Command::new("kill")
        .args(["-TERM", hearth_pid])
        .status()
        .unwrap()
        .success());
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let trace = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = trace
        .lines()
        .filter(|l| {
            ["bind(", "connect(", "sendto(", "sendmsg("]
                .iter()
                .any(|c| l.contains(c))
        })
        .collect();
    let outside: Vec<&&str> = calls.iter().filter(|l| !local(l)).collect();
    assert!(
        outside.is_empty(),
        "non-loopback socket calls: {outside:#?}"
    );
    // The trace did see the server work: it bound loopback and accepted our requests.
    assert!(
        trace
            .lines()
            .any(|l| l.contains("bind(") && l.contains("127.0.0.1")),
        "{trace}"
    );
    let accepted = trace
        .lines()
        .filter(|l| l.contains("accept4(") && l.contains("127.0.0.1"))
        .count();
    assert!(accepted >= 6, "accepts seen: {accepted}");
    assert!(
        !trace
            .lines()
            .any(|l| l.contains("socket(AF_INET") && l.contains("SOCK_DGRAM")),
        "no UDP socket (no DNS lookups): {trace}"
    );
}

#[test]
fn serves_in_a_namespace_with_only_loopback() {
    // The cycle runs inside the namespace: this test binary, started again there.
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-rn", "sh", "-c", "ip link set lo up && exec \"$0\" --exact inner_namespace_cycle --ignored --nocapture --test-threads 1"])
        .arg(&exe)
        .env("HEARTH_EGRESS_INNER", "1")
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("interfaces: [\"lo\"]"), "{stdout}");
}

/// Run by `serves_in_a_namespace_with_only_loopback` inside the namespace.
#[test]
#[ignore = "runs inside the network namespace the other test makes"]
fn inner_namespace_cycle() {
    assert_eq!(std::env::var("HEARTH_EGRESS_INNER").as_deref(), Ok("1"));
    // This process's own namespace (sysfs would show the one it was mounted in).
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/self/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect();
    println!("interfaces: {interfaces:?}");
    assert_eq!(interfaces, ["lo"]);
    let mut server = Server::start(&[]);
    full_cycle(&server);
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(server.child.wait().unwrap().success());
}

#[test]
fn the_address_check_tells_loopback_from_the_world() {
    let inet = |a: &str| {
        format!("12 connect(9, {{sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr(\"{a}\")}}, 16) = 0")
    };
    assert!(local(&inet("127.0.0.1")));
    assert!(!local(&inet("10.0.0.1")));
    assert!(!local(&inet("8.8.8.8")));
    let v6 = |a: &str| {
        format!("12 connect(9, {{sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, \"{a}\", &sin6_addr), sin6_scope_id=0}}, 28) = -1")
    };
    assert!(local(&v6("::1")));
    assert!(!local(&v6("2606:4700::1111")));
    assert!(local(
        "12 connect(3, {sa_family=AF_UNIX, sun_path=\"/run/x\"}, 110) = 0"
    ));
    assert!(local(
        "12 sendto(9, \"data\", 4, MSG_NOSIGNAL, NULL, 0) = 4"
    ));
}
