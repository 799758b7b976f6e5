//! Metrics, Server-Timing and logs as operators consume them, from a real server.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::binary::BinaryServer;
use common::{user, TestServer, FAST};
use serde_json::{json, Value};

/// A sample's key in [`scrape`]'s map.
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// `/metrics` parsed as Prometheus text: sample name + sorted labels → value.
async fn scrape(server: &TestServer) -> HashMap<String, f64> {
    let text = server.metrics().await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    parsed
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let labels: Vec<(&str, &str)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            Some((key(&sample.metric, &labels), value))
        })
        .collect()
}

#[tokio::test]
async fn metrics_parse_and_every_request_adds_one_ttft_observation() {
    let server = TestServer::fast().await;
    let text = server.metrics().await;
    // Every histogram has explicit buckets (a +Inf bucket alone would mean none).
    for histogram in [
        "tiergate_time_to_first_token_seconds",
        "tiergate_inter_token_latency_seconds",
        "tiergate_e2e_request_latency_seconds",
        "tiergate_queue_time_seconds",
        "tiergate_prefill_time_seconds",
        "tiergate_batch_size",
    ] {
        assert!(
            text.contains(&format!("# TYPE {histogram} histogram")),
            "{histogram}\n{text}"
        );
    }
    let model = [("model", FAST), ("tier", "fast")];
    let ttft_count = key("tiergate_time_to_first_token_seconds_count", &model);
    let before = scrape(&server)
        .await
        .get(&ttft_count)
        .copied()
        .unwrap_or(0.0);

    // Greedy: a sampled reply may draw tokens that are parts of one character, which
    // arrive as one piece and leave fewer gaps to observe.
    let body = json!({
        "model": "auto", "messages": user("Hi"), "max_tokens": 4, "ignore_eos": true,
        "temperature": 0
    });
    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    // Non-streaming replies say where their time went.
    let timing = response.headers()["server-timing"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for stage in ["route;dur=", "queue;dur=", "prefill;dur=", "decode;dur="] {
        assert!(timing.contains(stage), "{timing}");
    }
    let _ = response.bytes().await;

    let after = scrape(&server).await;
    assert_eq!(
        after.get(&ttft_count).copied(),
        Some(before + 1.0),
        "{after:?}"
    );
    let finished = [
        model[0],
        model[1],
        ("status", "200"),
        ("finish_reason", "length"),
    ];
    for (sample, at_least) in [
        (key("tiergate_requests_total", &finished), 1.0),
        (
            key("tiergate_inter_token_latency_seconds_count", &model),
            3.0,
        ),
        (
            key("tiergate_e2e_request_latency_seconds_count", &model),
            1.0,
        ),
        (key("tiergate_queue_time_seconds_count", &model), 1.0),
        (key("tiergate_prefill_time_seconds_count", &model), 1.0),
        (key("tiergate_batch_size_count", &model), 4.0),
        (key("tiergate_generation_tokens_total", &model), 4.0),
    ] {
        let value = after.get(&sample).copied();
        assert!(value.is_some_and(|v| v >= at_least), "{sample} = {value:?}");
    }
    let kv = after
        .get(&key("tiergate_kv_cache_usage_ratio", &model))
        .copied();
    assert!(kv.is_some_and(|v| (0.0..=1.0).contains(&v)), "{kv:?}");
    // The router's Rust tokenizer counted the prompt exactly as llama.cpp tokenized it.
    let mismatches = after
        .get(&key("tiergate_prompt_token_count_mismatches_total", &model))
        .copied();
    assert_eq!(mismatches, Some(0.0));
    // The sequence leaves at the end of its last step: every slot is free again.
    let free = format!(r#"tiergate_free_slots{{model="{FAST}",tier="fast"}}"#);
    server
        .wait_for_metric(&free, 8.0, Duration::from_secs(5))
        .await;
    server.stop().await;
}

#[tokio::test]
async fn json_logs_parse_and_carry_an_access_line_and_the_stages() {
    let mut server = BinaryServer::start(|command| {
        command
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,tiergate=debug");
    })
    .await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/chat/completions", server.base))
        .json(
            &json!({"model": "auto", "messages": user("Hi"), "max_tokens": 3, "ignore_eos": true}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON reply");
    server.sigterm();
    let status = server.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");

    let mut closed_spans = Vec::new();
    let mut access_lines = Vec::new();
    for line in server.log_lines() {
        let entry: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if entry["fields"]["message"] == "close" {
            closed_spans.push(entry["span"].clone());
        }
        if entry["target"] == "tiergate::access" {
            access_lines.push(entry);
        }
    }
    // One access line for the one request, inside its span (which names the reply's id).
    let [access] = access_lines.as_slice() else {
        panic!("expected one access line, got {access_lines:?}");
    };
    let line = &access["fields"];
    assert_eq!(line["status"], "200", "{access}");
    assert_eq!(line["model"], FAST);
    assert_eq!(line["tier"], "fast");
    assert_eq!(line["completion_tokens"], 3);
    assert_eq!(line["finish_reason"], "length");
    assert!(
        line["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{access}"
    );
    assert!(line["ttft_ms"].is_u64(), "{access}");
    assert!(line["total_ms"].is_u64(), "{access}");
    assert!(line["rule"].is_string(), "{access}");
    // The line names the reply the client got.
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(access["span"]["id"], body["id"], "{access}");
    let span = |name: &str| {
        closed_spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` span closed in {closed_spans:?}"))
            .clone()
    };
    // At debug, each stage's span closes with its own line and duration.
    assert_eq!(span("request")["id"], access["span"]["id"]);
    assert!(span("prefill")["prompt_tokens"]
        .as_u64()
        .is_some_and(|n| n > 0));
    assert_eq!(span("decode")["completion_tokens"], 3);
    span("queue");
    span("route");
}

#[tokio::test]
async fn at_the_default_level_each_request_is_one_access_line_and_spans_are_not_timed() {
    let mut server = BinaryServer::start(|command| {
        command.env_remove("RUST_LOG");
    })
    .await;
    let client = reqwest::Client::new();
    for max_tokens in [2, 3] {
        let response = client
            .post(format!("{}/v1/chat/completions", server.base))
            .json(
                &json!({"model": "auto", "messages": user("Hi"), "max_tokens": max_tokens,
                          "ignore_eos": true}),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await;
    }
    // A refusal after routing began (an unknown model) is logged too, with its status.
    let refused = client
        .post(format!("{}/v1/chat/completions", server.base))
        .json(&json!({"model": "no-such-model", "messages": user("Hi")}))
        .send()
        .await
        .expect("request");
    let refused_status = refused.status().as_u16().to_string();
    server.sigterm();
    let status = server.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");

    let lines = server.log_lines();
    let access: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("tiergate::access"))
        .collect();
    assert_eq!(access.len(), 3, "{access:#?}");
    assert!(access[0].contains("completion_tokens=2"), "{}", access[0]);
    assert!(access[1].contains("completion_tokens=3"), "{}", access[1]);
    assert!(
        access[2].contains(&format!("status={refused_status}")),
        "{}",
        access[2]
    );
    // Span timing is a debug-level detail: no span closes at info.
    let timed: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("time.busy"))
        .collect();
    assert!(timed.is_empty(), "{timed:#?}");
}
