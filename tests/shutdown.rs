//! SIGTERM on the real binary: new connections are refused at once, the reply already
//! streaming finishes, and the process exits 0.
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use common::binary::BinaryServer;
use common::{parse_sse, user};
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn sigterm_drains_streaming_replies_then_exits_zero() {
    let mut server = BinaryServer::start(|_| {}).await;
    let base = server.base.clone();
    let client = reqwest::Client::new();

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

    server.sigterm();

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

    let status = server.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
}
