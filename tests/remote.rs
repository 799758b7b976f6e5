//! Remote tiers: a fleet of OpenAI-compatible endpoints behind the same routing, budgets
//! and metrics. The real path runs against a second tiergate process on the fast model;
//! the faults (no first token, 500s, a cut stream, slow tokens, refused connections, a
//! client that leaves) come from a scripted upstream inside the test.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::BinaryServer;
use common::upstream::{closing_endpoint, refused_url, Script, ScriptedUpstream};
use common::{fixture, header, parse_sse, streamed_text, wait_until, TestServer, FAST};
use futures::StreamExt;
use serde_json::{json, Value};
use tiergate::config::Config;
use tiergate::remote::endpoint::{affinity_key, affinity_rank};

/// A config of two remote tiers, `fast` and `full`, over these endpoints, with quick
/// health checks and ejections so that tests see them happen. `extra` is added to both.
fn fleet_config(fast: &[&str], full: &[&str], extra: &str) -> Config {
    let list = |urls: &[&str]| {
        urls.iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
[router]
policies = ["{policy}"]
watch = false

[[model]]
id = "fleet-fast"
tier = "fast"
endpoints = [{fast}]
health_interval_ms = 100
{extra}

[[model]]
id = "fleet-full"
tier = "full"
endpoints = [{full}]
upstream_model = "served-name"
health_interval_ms = 100
{extra}
"#,
        policy = fixture("fleet.toml").display(),
        fast = list(fast),
        full = list(full),
    );
    Config::parse(Path::new("/tmp/fleet.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

async fn fleet(fast: &[&str], full: &[&str], extra: &str) -> TestServer {
    let config = fleet_config(fast, full, extra);
    TestServer::start(move |c| *c = config).await
}

/// A user message whose conversation prefers `url` over `others` by prefix affinity;
/// each `salt` gives a different one.
fn prompt_preferring(url: &str, others: &[&str], salt: usize) -> String {
    (0..)
        .map(|i| format!("question {salt}.{i}"))
        .find(|prompt| {
            let key = affinity_key(prompt, "user");
            others
                .iter()
                .all(|o| affinity_rank(key, url) > affinity_rank(key, o))
        })
        .expect("some prompt prefers it")
}

/// One sample of a `fleet-full` endpoint's metric, e.g. `upstream_ejections_total`,
/// with the attempt outcome when the metric has one.
fn sample(metric: &str, url: &str, outcome: Option<&str>) -> String {
    let outcome = outcome.map_or_else(String::new, |o| format!(r#",outcome="{o}""#));
    format!(r#"tiergate_{metric}{{model="fleet-full",tier="full",endpoint="{url}"{outcome}}}"#)
}

/// `/ready`'s body.
async fn ready_body(server: &TestServer) -> Value {
    let response = server.client.get(server.url("/ready")).send().await;
    let Ok(response) = response else {
        return Value::Null;
    };
    response.json().await.unwrap_or_default()
}

fn ask(content: &str) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 16})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_streams_tiergates_own_chunks_and_names_the_endpoint() {
    let fast = ScriptedUpstream::start(Script::tokens(5, 5)).await;
    let full = ScriptedUpstream::start(Script::tokens(5, 5)).await;
    let server = fleet(&[&fast.url], &[&full.url], "").await;

    let mut body = ask("hello");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(full.url.as_str())
    );
    assert_eq!(header(&response, "x-tiergate-model"), Some("fleet-full"));
    let payloads = parse_sse(&response.text().await.expect("body"));
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("json"))
        .collect();
    let id = chunks[0]["id"].as_str().expect("id");
    assert!(
        id.starts_with("chatcmpl-") && id != "chatcmpl-upstream",
        "{id}"
    );
    for chunk in &chunks {
        assert_eq!(chunk["id"], id, "one id for every chunk");
        assert_eq!(
            chunk["model"], "fleet-full",
            "the model that answered, as configured"
        );
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }
    // tiergate's own role chunk (sent once the first token is in hand), then the text.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "word0 ");
    assert_eq!(streamed_text(&payloads), "word0 word1 word2 word3 word4 ");
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(usage["prompt_tokens"], 11, "the upstream's own count");
    assert_eq!(usage["completion_tokens"], 5);
    let sent = full
        .seen
        .last_body
        .lock()
        .expect("lock")
        .clone()
        .expect("a body");
    assert_eq!(sent["model"], "served-name");
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["max_tokens"], 16);

    // Non-streaming: the same reply, collected.
    let response = server.post_chat(&ask("hello")).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.expect("json");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "word0 word1 word2 word3 word4 "
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert_eq!(reply["model"], "fleet-full");

    server
        .wait_for_metric(
            &sample("upstream_requests_total", &full.url, Some("ok")),
            2.0,
            Duration::from_secs(2),
        )
        .await;
    let ttft_count = sample(
        "upstream_time_to_first_token_seconds_count",
        &full.url,
        None,
    );
    assert_eq!(server.metric(&ttft_count).await, Some(2.0));
    let up = sample("upstream_up", &full.url, None);
    assert_eq!(server.metric(&up).await, Some(1.0));
    assert_eq!(fast.requests(), 0, "routed to full");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_token_move_to_another_endpoint_and_eject_the_failing_one() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let bad = ScriptedUpstream::start(Script::Status(500)).await;
    let good = ScriptedUpstream::start(Script::tokens(3, 1)).await;
    let server = fleet(
        &[&fast.url],
        &[&bad.url, &good.url],
        "failure_threshold = 2\neject_ms = 60000",
    )
    .await;
    // Four conversations that each prefer `bad`: the first two fail there and are retried
    // on `good`, which ejects `bad`; the other two go straight to `good`.
    for salt in 0..4 {
        let prompt = prompt_preferring(&bad.url, &[&good.url], salt);
        let response = server.post_chat(&ask(&prompt)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-tiergate-endpoint"),
            Some(good.url.as_str())
        );
        assert_eq!(header(&response, "x-tiergate-degraded"), None);
    }
    assert_eq!(bad.requests(), 2, "ejected after two failures");
    assert_eq!(
        server
            .metric(&sample("upstream_ejections_total", &bad.url, None))
            .await,
        Some(1.0)
    );
    assert_eq!(
        server
            .metric(&sample(
                "upstream_requests_total",
                &bad.url,
                Some("http_500")
            ))
            .await,
        Some(2.0)
    );
    assert_eq!(
        server.metric(&sample("upstream_up", &bad.url, None)).await,
        Some(0.0)
    );
    assert_eq!(
        server
            .metric(r#"tiergate_upstream_retries_total{model="fleet-full",tier="full"}"#)
            .await,
        Some(2.0)
    );
    let ready = ready_body(&server).await;
    assert_eq!(ready["status"], "ready", "one endpoint is enough: {ready}");
    let states = &ready["endpoints"]["fleet-full"];
    assert_eq!(states[0]["state"], "ejected", "{ready}");
    assert!(states[0]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("500")));
    assert_eq!(states[1]["state"], "healthy");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_endpoint_gets_one_trial_request_after_its_wait_and_comes_back() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let flaky = ScriptedUpstream::start(Script::Status(503)).await;
    let good = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let server = fleet(
        &[&fast.url],
        &[&flaky.url, &good.url],
        "failure_threshold = 1\neject_ms = 2000",
    )
    .await;
    let prompt = prompt_preferring(&flaky.url, &[&good.url], 0);
    let response = server.post_chat(&ask(&prompt)).await;
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(good.url.as_str())
    );
    // Ejected: the same conversation goes to `good` while the wait lasts.
    let response = server.post_chat(&ask(&prompt)).await;
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(good.url.as_str())
    );
    assert_eq!(flaky.requests(), 1);

    flaky.set_script(Script::tokens(2, 1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let response = server.post_chat(&ask(&prompt)).await;
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(flaky.url.as_str()),
        "the trial request goes to the recovered endpoint"
    );
    let ready = ready_body(&server).await;
    assert_eq!(
        ready["endpoints"]["fleet-full"][0]["state"], "healthy",
        "{ready}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_first_token_moves_to_another_endpoint_and_closes_the_abandoned_request() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let stuck = ScriptedUpstream::start(Script::NoFirstToken).await;
    let good = ScriptedUpstream::start(Script::tokens(3, 1)).await;
    let server = fleet(
        &[&fast.url],
        &[&stuck.url, &good.url],
        "failure_threshold = 2\neject_ms = 60000",
    )
    .await;
    let prompt = prompt_preferring(&stuck.url, &[&good.url], 0);
    let response = server.post_chat(&ask(&prompt)).await;
    assert_eq!(response.status(), 200);
    // Within the same tier: the fleet gave the stuck endpoint part of the budget.
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(good.url.as_str())
    );
    assert_eq!(header(&response, "x-tiergate-tier"), Some("full"));
    assert_eq!(header(&response, "x-tiergate-degraded"), None);
    assert_eq!(stuck.requests(), 1);
    wait_until(Duration::from_secs(3), || async {
        stuck.disconnects() == 1
    })
    .await;
    assert_eq!(
        server
            .metric(&sample(
                "upstream_requests_total",
                &stuck.url,
                Some("first_token_late")
            ))
            .await,
        Some(1.0)
    );
    // Late is not a fault, but a replica that never answers must not keep taking
    // requests: a second late attempt in a row (the threshold) ejects it, each request
    // still answered by the other endpoint within its budget.
    for salt in 1..3 {
        let prompt = prompt_preferring(&stuck.url, &[&good.url], salt);
        let response = server.post_chat(&ask(&prompt)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-tiergate-degraded"), None);
        assert_eq!(
            header(&response, "x-tiergate-endpoint"),
            Some(good.url.as_str())
        );
    }
    assert_eq!(stuck.requests(), 2, "ejected after two late attempts");
    assert_eq!(
        server
            .metric(&sample("upstream_ejections_total", &stuck.url, None))
            .await,
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_no_first_token_in_time_degrades_to_the_smaller_tier() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let stuck = ScriptedUpstream::start(Script::NoFirstToken).await;
    let server = fleet(&[&fast.url], &[&stuck.url], "").await;
    let response = server.post_chat(&ask("anything")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-tier"), Some("fast"));
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=ttft_watchdog")
    );
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(fast.url.as_str())
    );
    // The watchdog dropped the stream; the fleet closed the upstream request.
    wait_until(Duration::from_secs(3), || async {
        stuck.disconnects() == 1
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_stream_ends_the_reply_with_an_error_event_and_is_counted() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let cut = ScriptedUpstream::start(Script::DropAfter(2)).await;
    let server = fleet(&[&fast.url], &[&cut.url], "").await;
    let mut body = ask("anything");
    body["stream"] = json!(true);
    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200, "the stream had started");
    let header_tier = header(&response, "x-tiergate-tier").map(str::to_owned);
    let raw = response.text().await.expect("body");
    let events: Vec<&str> = raw.split("\n\n").filter(|e| !e.is_empty()).collect();
    let (last, pieces) = events.split_last().expect("events");
    assert_eq!(
        header_tier,
        Some("full".to_owned()),
        "not degraded: text had been sent"
    );
    assert_eq!(
        pieces.len(),
        3,
        "the role chunk and both pieces before the cut: {raw}"
    );
    let error = last
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("an SSE error event last: {raw}"));
    let error: Value = serde_json::from_str(error).expect("json");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["code"], "upstream_error");
    assert!(
        !raw.contains("[DONE]"),
        "a failed stream does not end as if complete"
    );
    server
        .wait_for_metric(
            &sample(
                "upstream_requests_total",
                &cut.url,
                Some("dropped_mid_stream"),
            ),
            1.0,
            Duration::from_secs(2),
        )
        .await;
    let failed = r#"tiergate_requests_total{model="fleet-full",tier="full",status="stream_error",finish_reason="error"}"#;
    server
        .wait_for_metric(failed, 1.0, Duration::from_secs(2))
        .await;
    assert_eq!(cut.requests(), 1, "never retried once text was sent");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tokens_reach_the_client_as_they_come() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let slow = ScriptedUpstream::start(Script::tokens(4, 300)).await;
    let server = fleet(&[&fast.url], &[&slow.url], "").await;
    let mut body = ask("anything");
    body["stream"] = json!(true);
    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut raw = String::new();
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.expect("bytes");
        let text = String::from_utf8_lossy(&bytes);
        if text.contains("word") {
            arrivals.push(Instant::now());
        }
        raw.push_str(&text);
    }
    assert_eq!(streamed_text(&parse_sse(&raw)), "word0 word1 word2 word3 ");
    assert_eq!(
        arrivals.len(),
        4,
        "one chunk per piece, none held back: {raw}"
    );
    // Sent 300 ms apart: relayed as they came, not collected (a loaded machine may delay
    // one chunk, so each gap is held to half that, and the whole span to most of it).
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(150),
            "relayed as they came: {gap:?}"
        );
    }
    assert!(arrivals[3] - arrivals[0] >= Duration::from_millis(750));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_elsewhere_and_a_fleet_with_none_left_degrades() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let good = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let refused = refused_url().await;
    // No active checks: the refusal is found by a request, and retried on `good`.
    let server = fleet(&[&fast.url], &[&refused, &good.url], "health_path = \"\"").await;
    let prompt = prompt_preferring(&refused, &[&good.url], 0);
    let response = server.post_chat(&ask(&prompt)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(good.url.as_str())
    );
    assert_eq!(
        server
            .metric(&sample(
                "upstream_requests_total",
                &refused,
                Some("connect_error")
            ))
            .await,
        Some(1.0)
    );
    server.stop().await;

    // A fleet whose only endpoint refuses: its health check marks it down, and requests
    // routed to it are served by the smaller tier.
    let config = fleet_config(&[&fast.url], &[&refused], "");
    let server = TestServer::launch(move |c| *c = config).await;
    wait_until(Duration::from_secs(5), || async {
        let ready = ready_body(&server).await;
        ready["endpoints"]["fleet-full"][0]["state"] == "failing_checks"
            && ready["endpoints"]["fleet-fast"][0]["state"] == "healthy"
    })
    .await;
    let ready = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503, "a fleet with no endpoint is down");
    let response = server.post_chat(&ask("anything")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=unavailable")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_under_the_request_is_resent_once_then_failed_over() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let (closing, connections) = closing_endpoint().await;
    let server = fleet(
        &[&fast.url],
        &[&closing],
        "health_path = \"\"\nfailure_threshold = 2",
    )
    .await;
    let response = server.post_chat(&ask("anything")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=unavailable")
    );
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "sent, then resent once on a new connection"
    );
    assert_eq!(
        server
            .metric(&sample(
                "upstream_requests_total",
                &closing,
                Some("send_error")
            ))
            .await,
        Some(2.0)
    );
    // The first closed connection is the pool's race; only the second counts against it,
    // so two in a row do not reach the threshold of two.
    assert_eq!(
        server
            .metric(&sample("upstream_ejections_total", &closing, None))
            .await,
        Some(0.0)
    );
    let ready = ready_body(&server).await;
    assert!(
        ready["endpoints"]["fleet-full"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("the request failed")),
        "{ready}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_moves_the_request_without_ejecting_the_busy_endpoint() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let busy = ScriptedUpstream::start(Script::Status(429)).await;
    let good = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let server = fleet(
        &[&fast.url],
        &[&busy.url, &good.url],
        "failure_threshold = 1",
    )
    .await;
    for salt in 0..2 {
        let prompt = prompt_preferring(&busy.url, &[&good.url], salt);
        let response = server.post_chat(&ask(&prompt)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-tiergate-endpoint"),
            Some(good.url.as_str())
        );
    }
    assert_eq!(busy.requests(), 2, "still picked: busy is not broken");
    assert_eq!(
        server
            .metric(&sample("upstream_ejections_total", &busy.url, None))
            .await,
        Some(0.0)
    );
    // With every endpoint busy, the tier is full (queue_full), not down.
    good.set_script(Script::Status(429));
    let response = server.post_chat(&ask("anything")).await;
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=queue_full")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_reply_is_a_failure_not_a_finished_one() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let aborting = ScriptedUpstream::start(Script::AbortAfter(0)).await;
    let good = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let server = fleet(&[&fast.url], &[&aborting.url, &good.url], "").await;
    // Aborted before any text: retried on the other endpoint.
    let prompt = prompt_preferring(&aborting.url, &[&good.url], 0);
    let response = server.post_chat(&ask(&prompt)).await;
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(good.url.as_str())
    );
    // Aborted after text: the stream ends with an error event, not a `stop`.
    aborting.set_script(Script::AbortAfter(2));
    let prompt = prompt_preferring(&aborting.url, &[&good.url], 1);
    let mut body = ask(&prompt);
    body["stream"] = json!(true);
    let response = server.post_chat(&body).await;
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(aborting.url.as_str())
    );
    let raw = response.text().await.expect("body");
    assert!(raw.contains("event: error"), "{raw}");
    assert!(!raw.contains(r#""finish_reason":"stop""#), "{raw}");
    assert!(!raw.contains("[DONE]"), "{raw}");
    server
        .wait_for_metric(
            &sample("upstream_requests_total", &aborting.url, Some("aborted")),
            2.0,
            Duration::from_secs(2),
        )
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_remote_reply_names_its_endpoint_when_generated_and_not_when_replayed() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let full = ScriptedUpstream::start(Script::tokens(3, 1)).await;
    let mut config = fleet_config(&[&fast.url], &[&full.url], "");
    config.router.policies = vec![fixture("fleet-cached.toml")];
    let server = TestServer::start(move |c| *c = config).await;
    let body = json!({"model": "auto", "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "cache me"}]});
    let generated = server.post_chat(&body).await;
    assert_eq!(header(&generated, "x-tiergate-cache"), Some("miss"));
    assert_eq!(
        header(&generated, "x-tiergate-endpoint"),
        Some(full.url.as_str()),
        "the generation is shared through the cache, and still names its endpoint"
    );
    let text = generated.text().await.expect("body");
    let replayed = server.post_chat(&body).await;
    assert_eq!(header(&replayed, "x-tiergate-cache"), Some("hit"));
    assert_eq!(header(&replayed, "x-tiergate-endpoint"), None);
    let replayed: Value = replayed.json().await.expect("json");
    let generated: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        replayed["choices"][0]["message"]["content"],
        generated["choices"][0]["message"]["content"]
    );
    assert_eq!(full.requests(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_closes_the_upstream_request() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let long = ScriptedUpstream::start(Script::tokens(100, 50)).await;
    let server = fleet(&[&fast.url], &[&long.url], "").await;
    let mut body = ask("anything");
    body["stream"] = json!(true);
    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("a chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("word0"));
    drop(stream);
    wait_until(Duration::from_secs(3), || async { long.disconnects() == 1 }).await;
    server
        .wait_for_metric(
            &sample("upstream_outstanding_requests", &long.url, None),
            0.0,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(
        server
            .metric(&sample(
                "upstream_requests_total",
                &long.url,
                Some("client_closed")
            ))
            .await,
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_400_is_the_clients_error_and_is_not_retried() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let one = ScriptedUpstream::start(Script::Status(400)).await;
    let two = ScriptedUpstream::start(Script::Status(400)).await;
    let server = fleet(&[&fast.url], &[&one.url, &two.url], "").await;
    let response = server.post_chat(&ask("anything")).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["code"], "upstream_rejected");
    assert!(error["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("scripted failure")));
    assert_eq!(
        one.requests() + two.requests(),
        1,
        "the same request fails anywhere"
    );
    assert_eq!(fast.requests(), 0, "a client error does not degrade");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_stays_on_one_endpoint_and_conversations_spread() {
    let fast = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let a = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let b = ScriptedUpstream::start(Script::tokens(2, 1)).await;
    let server = fleet(&[&fast.url], &[&a.url, &b.url], "").await;
    let mut seen = std::collections::HashSet::new();
    for system in 0..12 {
        let mut endpoints = std::collections::HashSet::new();
        for question in 0..3 {
            let body = json!({"model": "auto", "max_tokens": 8, "messages": [
                {"role": "system", "content": format!("You are assistant number {system}.")},
                {"role": "user", "content": format!("question {question}")},
            ]});
            let response = server.post_chat(&body).await;
            assert_eq!(response.status(), 200);
            let endpoint = header(&response, "x-tiergate-endpoint").expect("endpoint");
            endpoints.insert(endpoint.to_owned());
        }
        assert_eq!(
            endpoints.len(),
            1,
            "one system prompt, one endpoint: {endpoints:?}"
        );
        seen.extend(endpoints);
    }
    assert_eq!(seen.len(), 2, "twelve system prompts use both endpoints");
    server.stop().await;
}

/// A remote `full` model on `url`, counting with the SmolLM2 vocabulary in `gguf`.
fn server_config_model(url: &str, gguf: &str) -> tiergate::config::ModelConfig {
    let text = format!(
        r#"
[[model]]
id = "remote-smollm"
tier = "full"
endpoints = ["{url}"]
upstream_model = "{FAST}"
tokenizer = "{gguf}"
context = 1024
"#
    );
    let mut config =
        Config::parse(Path::new("/tmp/remote.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
    config.models.remove(0)
}

/// The real path: a second tiergate process on the fast model is the upstream of a
/// remote tier, beside a local tier in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_tiergate_process_serves_a_remote_tier_beside_a_local_one() {
    let upstream = BinaryServer::start(|_| {}).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let gguf = format!("{root}/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    let upstream_url = format!("{}/v1", upstream.base);
    let remote = server_config_model(&upstream_url, &gguf);
    let server = TestServer::start(|config| {
        config.models.retain(|m| m.id == FAST);
        config.models.push(remote);
        config.router.policies = vec![fixture("fleet.toml")];
        config.embedding = None;
    })
    .await;
    let question = "Name a primary colour.";
    let greedy = |model: &str| {
        json!({"model": model, "temperature": 0, "max_tokens": 12,
               "messages": [{"role": "user", "content": question}]})
    };
    // Directly from the upstream, then through the remote tier: the same greedy reply.
    let direct: Value = server
        .client
        .post(format!("{upstream_url}/chat/completions"))
        .json(&greedy(FAST))
        .send()
        .await
        .expect("direct")
        .json()
        .await
        .expect("json");
    let mut body = greedy("auto");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-tier"), Some("full"));
    assert_eq!(
        header(&response, "x-tiergate-endpoint"),
        Some(upstream_url.as_str())
    );
    let payloads = parse_sse(&response.text().await.expect("body"));
    let direct_text = direct["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(!direct_text.is_empty());
    assert_eq!(streamed_text(&payloads), direct_text);
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).expect("usage");
    assert_eq!(
        usage["usage"], direct["usage"],
        "the upstream's usage, passed on"
    );
    assert_eq!(usage["model"], "remote-smollm");

    // The remote tier counts prompts (for routing and budgets) with its tokenizer: the
    // same count as the upstream's own.
    let remote_config = server_config_model(&upstream_url, &gguf);
    let prompter = tiergate::remote::load_tokenizer(&remote_config)
        .expect("tokenizer")
        .expect("configured");
    let messages = [tiergate::chat::ChatMessage::user(question)];
    assert_eq!(
        json!(prompter.count(&messages).expect("count")),
        direct["usage"]["prompt_tokens"]
    );

    // The local tier is still local: no endpoint header.
    let response = server.post_chat(&greedy("fast")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-endpoint"), None);
    assert_eq!(header(&response, "x-tiergate-tier"), Some("fast"));
    server.stop().await;
    drop(upstream);
}

/// Tool calling through a remote tier, beside a local tier that cannot call tools: the
/// request routes around the local tier, `tools` and the tool messages reach the upstream
/// unchanged, and the unmodified `openai` SDK reads the calls back, streamed and not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_pass_through_a_remote_tier_and_skip_the_local_one() {
    let upstream = ScriptedUpstream::start(Script::ToolCalls).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let gguf = format!("{root}/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    let remote = server_config_model(&upstream.url, &gguf);
    let server = TestServer::start(|config| {
        config.models.retain(|m| m.id == FAST);
        config.models.push(remote);
        // Routes everything to `fast` unless told otherwise: a tool call must go to `full`.
        config.router.policies = vec![fixture("fast-only.toml")];
        config.embedding = None;
    })
    .await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({"model": "auto", "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools, "tool_choice": "required", "parallel_tool_calls": true, "max_tokens": 50});

    // The dry run says why the local tier was passed over.
    let explained: Value = server
        .client
        .post(server.url("/v1/route"))
        .json(&body)
        .send()
        .await
        .expect("route")
        .json()
        .await
        .expect("json");
    let why = &explained["features"]["unservable_tiers"]["fast"];
    assert!(
        why.as_str().is_some_and(|w| w.contains("no tool support")),
        "{explained}"
    );

    let response = server.post_chat(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-tier"), Some("full"));
    assert_eq!(header(&response, "x-tiergate-degraded"), None);
    let reply: Value = response.json().await.expect("json");
    let message = &reply["choices"][0]["message"];
    assert!(message["content"].is_null(), "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(message["tool_calls"][0]["id"], "call_weather_1");
    assert_eq!(
        message["tool_calls"][1]["function"]["arguments"],
        common::upstream::TOOL_CALLS[1].2
    );
    let sent = upstream.last_body().expect("a request");
    // Unchanged, key order included (`Value` equality would ignore order).
    assert_eq!(sent["tools"].to_string(), tools.to_string());
    assert_eq!(sent["tool_choice"], "required");
    assert_eq!(sent["parallel_tool_calls"], true);

    // Streamed: the deltas arrive as the upstream sent them, each call under its index.
    let payloads = server.stream(body.clone()).await;
    let deltas: Vec<Value> = payloads
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str::<Value>(p).expect("chunk"))
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls").cloned())
        .collect();
    assert_eq!(deltas.len(), 8, "{payloads:?}");
    assert_eq!(deltas[0][0]["function"]["name"], "get_weather");
    assert_eq!(deltas[4][0]["index"], 1);
    assert!(payloads
        .iter()
        .any(|p| p.contains(r#""finish_reason":"tool_calls""#)));

    // Pinned to the local tier: a 400 naming `tools`, not a silent answer without them.
    let mut pinned = body.clone();
    pinned["model"] = json!("fast");
    let refused = server.post_chat(&pinned).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["param"], "tools", "{error}");

    // The unmodified SDK, streamed and not, and a second turn with the tools' results.
    let script = format!("{root}/tests/sdk/tool_calls.py");
    let base = server.base.clone();
    let sdk = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([&script, &base, "auto"])
            .output()
    })
    .await
    .expect("joined")
    .expect("python3 runs (bootstrap installs the openai package)");
    assert!(
        sdk.status.success(),
        "{}{}",
        String::from_utf8_lossy(&sdk.stdout),
        String::from_utf8_lossy(&sdk.stderr)
    );
    let sent = upstream.last_body().expect("a request");
    let messages = sent["messages"].as_array().expect("messages");
    assert_eq!(messages[1]["role"], "assistant");
    assert!(messages[1]["content"].is_null(), "{sent}");
    assert_eq!(messages[1]["tool_calls"][1]["id"], "call_time_2");
    assert_eq!(messages[3]["role"], "tool");
    assert_eq!(messages[3]["tool_call_id"], "call_time_2");

    // Several choices are generated locally only: pinned to the remote tier, a 400
    // naming `n`; left to routing, the local tier answers all of them.
    let choices = json!({"model": "full", "n": 2, "max_tokens": 3,
        "messages": [{"role": "user", "content": "Hi"}]});
    let refused = server.post_chat(&choices).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(error["error"]["param"], "n", "{error}");
    let mut routed = choices.clone();
    routed["model"] = json!("auto");
    let response = server.post_chat(&routed).await;
    assert_eq!(header(&response, "x-tiergate-tier"), Some("fast"));
    let reply: Value = response.json().await.expect("json");
    assert_eq!(
        reply["choices"].as_array().map(Vec::len),
        Some(2),
        "{reply}"
    );
    server.stop().await;
}
