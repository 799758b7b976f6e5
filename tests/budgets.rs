//! Latency budgets, degradation, the reply cache and admission control, end to end on
//! the real models. The stalled tier is the real Gemma engine slowed by
//! `fault_step_delay_ms`, not a stand-in.

mod common;

use std::time::{Duration, Instant};

use common::{fixture, header, parse_sse, streamed_text, user, TestServer, FAST, FULL};
use serde_json::{json, Value};
use tiergate::config::{ApiKeyConfig, Config, ModelConfig};

/// The tests that time first tokens against a budget, and those that load both models,
/// take turns: two at once on a 2-core machine would make each measure the other.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Both tiers on the stalled-full fixture (requests hinted `full` go to the full tier),
/// with a fault injected into the full model by `fault`.
async fn faulty_full_tier(fault: impl FnOnce(&mut ModelConfig)) -> TestServer {
    TestServer::start(|config: &mut Config| {
        config.router.policies = vec![fixture("stalled-full.toml")];
        let full = config
            .models
            .iter_mut()
            .find(|m| m.id == FULL)
            .expect("full model");
        fault(full);
    })
    .await
}

/// A fast-only server on the budgets fixture, with three API keys.
async fn keyed_fast_server() -> TestServer {
    TestServer::start(|config: &mut Config| {
        common::only_fast_tier(config);
        config.router.policies = vec![fixture("budgets.toml")];
        config.api_keys = vec![
            key("key-a", None),
            key("key-b", None),
            key("key-limited", Some(2)),
        ];
    })
    .await
}

fn key(key: &str, requests_per_minute: Option<u32>) -> ApiKeyConfig {
    ApiKeyConfig {
        key: key.into(),
        tenant: None,
        requests_per_minute,
        tokens_per_minute: None,
    }
}

/// A greedy request to whichever tier the policy picks.
fn greedy(prompt: &str, max_tokens: u32) -> Value {
    common::greedy("auto", prompt, max_tokens)
}

/// The text and `x-tiergate-cache` of a non-streaming reply that must succeed.
async fn complete(
    server: &TestServer,
    api_key: &str,
    hint: &str,
    body: &Value,
) -> (String, Option<String>, Value) {
    let response = server.post_as(Some(api_key), Some(hint), body).await;
    assert_eq!(response.status(), 200);
    let cache = header(&response, "x-tiergate-cache").map(str::to_owned);
    let json: Value = response.json().await.expect("json");
    let text = json["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    (text, cache, json)
}

#[tokio::test]
async fn stalled_full_tier_degrades_to_fast_within_the_budget_and_frees_its_slot() {
    let _turn = TIMED.lock().await;
    let server = faulty_full_tier(|full| full.fault_step_delay_ms = 8000).await;
    let full_active = format!(r#"tiergate_active_sequences{{model="{FULL}",tier="full"}}"#);
    let body = json!({
        "model": "auto", "messages": user("Say hello."), "max_tokens": 8,
        "temperature": 0.7, "stream": true,
    });

    // 1. Start-up measured a healthy tier, so the request is admitted there; the stall
    //    keeps its first token away, and the watchdog cancels it early enough for the
    //    fast tier to answer within the 2 s budget (at most half the budget early).
    let started = Instant::now();
    let response = server.post_as(None, Some("full"), &body).await;
    let waited = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=ttft_watchdog")
    );
    assert_eq!(header(&response, "x-tiergate-tier"), Some("fast"));
    assert!(
        waited >= Duration::from_secs(1),
        "the watchdog gives the full tier at least half the budget: {waited:?}"
    );
    let payloads = parse_sse(&response.text().await.expect("body"));
    let first: Value = serde_json::from_str(&payloads[0]).expect("chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["model"], FAST, "chunks name the model that answered");
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));

    // 2. Once the full tier's step has stalled for longer than the budget, prediction
    //    sees it: the next request degrades before queueing there, and its first token
    //    comes within the budget.
    tokio::time::sleep_until((started + Duration::from_millis(2500)).into()).await;
    let started = Instant::now();
    let response = server.post_as(None, Some("full"), &body).await;
    let ttft = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=predicted_ttft")
    );
    assert!(
        ttft < Duration::from_secs(2),
        "headers come with the first token: {ttft:?}"
    );
    let payloads = parse_sse(&response.text().await.expect("body"));
    assert!(!streamed_text(&payloads).is_empty());

    // 3. A request pinned to the full tier cannot degrade: 503 with Retry-After.
    let pinned =
        json!({"model": FULL, "messages": user("Hi"), "max_tokens": 4, "temperature": 0.7});
    let response = server.post_as(None, None, &pinned).await;
    assert_eq!(response.status(), 503);
    let retry_after: u64 = header(&response, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["code"], "overloaded", "{error}");

    // 4. The cancelled sequence leaves the full tier once its stalled step returns.
    server
        .wait_for_metric(&full_active, 0.0, Duration::from_secs(30))
        .await;
    let metrics = server.metrics().await;
    for sample in [
        r#"tiergate_degradations_total{from="full",to="fast",reason="ttft_watchdog"} 1"#,
        r#"tiergate_degradations_total{from="full",to="fast",reason="predicted_ttft"} 1"#,
        r#"tiergate_shed_total{tier="full"} 1"#,
    ] {
        assert!(metrics.contains(sample), "{sample} missing from\n{metrics}");
    }
    server.stop().await;
}

#[tokio::test]
async fn cached_replies_hit_expire_and_stay_per_key_unless_shared() {
    let server = keyed_fast_server().await;
    let body = greedy("Name one colour of the rainbow.", 12);

    let (text, cache, _) = complete(&server, "key-a", "cached", &body).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let (again, cache, _) = complete(&server, "key-a", "cached", &body).await;
    assert_eq!(cache.as_deref(), Some("hit"));
    assert_eq!(again, text);

    // A hit streams in the same SSE format as a generation.
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let response = server
        .post_as(Some("key-a"), Some("cached"), &streaming)
        .await;
    assert_eq!(header(&response, "x-tiergate-cache"), Some("hit"));
    let payloads = parse_sse(&response.text().await.expect("body"));
    let first: Value = serde_json::from_str(&payloads[0]).expect("chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&payloads), text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));

    // Another key does not see key-a's reply...
    let (_, cache, _) = complete(&server, "key-b", "cached", &body).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    // ...unless the route shares its cache.
    let (_, cache, _) = complete(&server, "key-a", "shared", &body).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let (_, cache, _) = complete(&server, "key-b", "shared", &body).await;
    assert_eq!(cache.as_deref(), Some("hit"));

    // A one-second TTL expires.
    let short = greedy("Name one fruit.", 6);
    let (_, cache, _) = complete(&server, "key-a", "short-ttl", &short).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let (_, cache, _) = complete(&server, "key-a", "short-ttl", &short).await;
    assert_eq!(cache.as_deref(), Some("hit"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (_, cache, _) = complete(&server, "key-a", "short-ttl", &short).await;
    assert_eq!(cache.as_deref(), Some("miss"));

    // Requests that may sample differently are never cached.
    let sampled =
        json!({"model": "auto", "messages": user("Hi"), "max_tokens": 4, "temperature": 0.9});
    let response = server
        .post_as(Some("key-a"), Some("cached"), &sampled)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-cache"), None);
    server.stop().await;
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_generation() {
    let server = keyed_fast_server().await;
    let generated = format!(r#"tiergate_generation_tokens_total{{model="{FAST}",tier="fast"}}"#);
    let before = server.metric(&generated).await.unwrap_or(0.0);
    let body = greedy("Write a sentence about the sea.", 24);
    let replies =
        futures::future::join_all((0..6).map(|_| complete(&server, "key-a", "cached", &body)))
            .await;

    let misses = replies
        .iter()
        .filter(|(_, cache, _)| cache.as_deref() == Some("miss"))
        .count();
    assert_eq!(misses, 1, "exactly one request generates: {replies:?}");
    for (text, cache, _) in &replies {
        assert!(
            matches!(cache.as_deref(), Some("miss" | "shared" | "hit")),
            "{cache:?}"
        );
        assert_eq!(text, &replies[0].0);
    }
    let completion_tokens = replies[0].2["usage"]["completion_tokens"]
        .as_f64()
        .expect("usage");
    let after = server.metric(&generated).await.unwrap_or(0.0);
    assert_eq!(
        after - before,
        completion_tokens,
        "the tokens of one generation, not six"
    );
    server.stop().await;
}

#[tokio::test]
async fn keys_are_required_and_quotas_answer_429_with_retry_after() {
    let server = keyed_fast_server().await;
    let body = json!({"model": "auto", "messages": user("Hi"), "max_tokens": 1});

    for api_key in [None, Some("not-a-key")] {
        let response = server.post_as(api_key, None, &body).await;
        assert_eq!(response.status(), 401, "{api_key:?}");
        let error: Value = response.json().await.expect("json");
        assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }

    for _ in 0..2 {
        let response = server.post_as(Some("key-limited"), None, &body).await;
        assert_eq!(response.status(), 200);
    }
    let response = server.post_as(Some("key-limited"), None, &body).await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = header(&response, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    // Two per minute: the next request's allowance returns within 30 s.
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["error"]["type"], "requests");
    // Other keys are not affected.
    assert_eq!(
        server.post_as(Some("key-a"), None, &body).await.status(),
        200
    );

    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"tiergate_rate_limited_total{reason="requests_per_minute"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tiergate_rate_limited_total{reason="auth"} 2"#));
    server.stop().await;
}

#[tokio::test]
async fn total_budget_ends_the_reply_with_length_and_says_so() {
    let server = keyed_fast_server().await;
    let fast_active = format!(r#"tiergate_active_sequences{{model="{FAST}",tier="fast"}}"#);
    let body = json!({
        "model": "auto", "messages": user("Count upwards from one."),
        "max_tokens": 1000, "ignore_eos": true, "temperature": 0.7, "stream": true,
    });
    let response = server
        .post_as(Some("key-a"), Some("tight-total"), &body)
        .await;
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "{text}");
    let payloads = parse_sse(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&payloads[payloads.len() - 2]).expect("chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["tiergate"]["budget_cut"], "total", "{last}");
    assert!(payloads.len() < 1000, "cut long before max_tokens");
    server
        .wait_for_metric(&fast_active, 0.0, Duration::from_secs(10))
        .await;

    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let response = server
        .post_as(Some("key-a"), Some("tight-total"), &whole)
        .await;
    assert_eq!(header(&response, "x-tiergate-budget-cut"), Some("total"));
    let json: Value = response.json().await.expect("json");
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert!(json["usage"]["completion_tokens"].as_u64().expect("usage") < 1000);
    server.stop().await;
}

/// The shipped policy's 2 s TTFT budget on a server that has just started: a burst as
/// large as its slots must all be served, none shed on a cold start-up measurement.
#[tokio::test]
async fn a_fresh_gateway_sheds_none_of_a_burst_as_large_as_its_slots() {
    let _turn = TIMED.lock().await;
    let server = TestServer::start(|config: &mut Config| {
        common::only_fast_tier(config);
        config.router.policies = vec![fixture("budgets.toml")];
    })
    .await;
    let slots = 8;
    let requests = (1..=slots).map(|n| {
        let body = json!({
            "model": "auto", "messages": user(&format!("Count from 1 to {n}.")),
            "max_tokens": 32, "temperature": 0.7,
        });
        let server = &server;
        async move { server.post_as(None, None, &body).await.status() }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request of the burst is served: {statuses:?}"
    );
    server.stop().await;
}

/// The real Gemma thread panics mid-generation (`fault_panic_after_steps`): its stream
/// ends with an error event instead of hanging, the tier is marked down (`/ready` 503
/// naming it, `tiergate_model_up` 0), and the next request routed to it follows the
/// degrade path to the fast tier.
#[tokio::test]
async fn a_panicking_model_thread_marks_its_tier_down_and_requests_degrade() {
    let _turn = TIMED.lock().await;
    let server = faulty_full_tier(|full| full.fault_panic_after_steps = 3).await;
    let body = json!({
        "model": "auto", "messages": user("Count from one to twenty."), "max_tokens": 16,
        "temperature": 0.7, "stream": true,
    });
    let response = server.post_as(None, Some("full"), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-tier"), Some("full"));
    // The stream ends with an SSE error event (OpenAI's error shape) instead of hanging.
    let raw = response.text().await.expect("the stream ends");
    let (_, error) = raw
        .split_once("event: error\ndata: ")
        .unwrap_or_else(|| panic!("the stream reports the failure: {raw}"));
    let error: Value = serde_json::from_str(error.trim()).expect("error json");
    assert_eq!(error["error"]["type"], "server_error", "{error}");

    let up = format!(r#"tiergate_model_up{{model="{FULL}",tier="full"}}"#);
    server
        .wait_for_metric(&up, 0.0, Duration::from_secs(5))
        .await;
    let ready = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let ready_body = ready.text().await.expect("body");
    assert!(
        ready_body.contains(FULL) && ready_body.contains("panicked"),
        "{ready_body}"
    );

    let response = server.post_as(None, Some("full"), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tiergate-tier"), Some("fast"));
    assert_eq!(
        header(&response, "x-tiergate-degraded"),
        Some("full->fast; reason=unavailable")
    );
    let payloads = parse_sse(&response.text().await.expect("body"));
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    server.stop().await;
}
