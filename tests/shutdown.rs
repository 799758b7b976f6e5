//! SIGTERM on the real binary: new connections are refused at once, the reply already
//! streaming finishes, and the process exits 0.
#![cfg(unix)]

mod common;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{parse_sse, user};
use futures::StreamExt;
use serde_json::json;

/// A free port: bind port 0, read it, let it go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let path = dir.join("tiergate.toml");
    let mut file = std::fs::File::create(&path).expect("config file");
    write!(
        file,
        r#"
[server]
drain_timeout_s = 60

[router]
policies = ["{root}/tests/fixtures/fast-only.toml"]
watch = false

[[model]]
id = "smollm2-135m-instruct"
tier = "fast"
path = "{root}/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
n_ctx = 4096
slots = 4
threads = 1
"#
    )
    .expect("write config");
    path
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[tokio::test]
async fn sigterm_drains_streaming_replies_then_exits_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tiergate"),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client.get(format!("{base}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready within 120 s");
        assert!(
            server.0.try_wait().expect("status").is_none(),
            "exited early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A reply long enough to still be streaming when the signal comes.
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": "auto", "messages": user("Count upwards from one."),
            "max_tokens": 200, "ignore_eos": true, "stream": true,
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut raw = Vec::new();
    raw.extend_from_slice(&body.next().await.expect("first chunk").expect("bytes"));

    let killed = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    // New connections are refused once draining has begun.
    let refused_by = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = reqwest::Client::new()
            .get(format!("{base}/health"))
            .send()
            .await;
        if attempt.is_err() {
            break;
        }
        assert!(Instant::now() < refused_by, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The reply in flight finishes whole.
    while let Some(chunk) = body.next().await {
        raw.extend_from_slice(&chunk.expect("stream stays intact"));
    }
    let payloads = parse_sse(&String::from_utf8(raw).expect("utf-8"));
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let last: serde_json::Value =
        serde_json::from_str(&payloads[payloads.len() - 2]).expect("chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    let exit_by = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("status") {
            break status;
        }
        assert!(Instant::now() < exit_by, "did not exit after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
