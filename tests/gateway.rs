//! The gateway's timing logic (budgets, watchdog, stale serving, shedding, budget cuts,
//! cache sharing, drain) on scripted backends under tokio's paused clock: an 8-second
//! stall costs no wall time, and each case runs in milliseconds. The real-model tests in
//! `budgets.rs` and `chat_api.rs` keep the real path honest.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tiergate::admission::Admission;
use tiergate::budget::{BudgetError, CacheUse, DegradeReason};
use tiergate::cache::{CacheCounters, ReplyCache};
use tiergate::chat::ChatRequest;
use tiergate::config::ApiKeyConfig;
use tiergate::engine::load::LoadSnapshot;
use tiergate::engine::scripted::{Script, ScriptedEngine, Step};
use tiergate::engine::{Engine, EngineError, FinishReason};
use tiergate::gateway::{Gateway, GatewayError, GatewayParts, ReplyEvent, Served};
use tiergate::metrics::Metrics;
use tiergate::router::{Caller, PolicyStore};
use tiergate::server::{self, HttpOptions};
use tiergate::tiers::Tiers;
use tokio::time::Instant;

const BUDGETS: &str = r#"
[defaults]
tier = "fast"
ttft_ms = 2000
total_ms = 60000
cache = "off"

[[rule]]
name = "to-full"
when = { hint = ["full"] }
tier = "full"

[[rule]]
name = "cached"
when = { hint = ["cached"] }
cache = "deterministic"
cache_ttl_s = 1
max_stale_s = 60

[[rule]]
name = "tight-total"
when = { hint = ["tight-total"] }
ttft_ms = 500
total_ms = 1000
"#;

/// A gateway over two scripted tiers, `fast` (listed first, so `full` degrades to it) and
/// `full`, with the policy above.
struct Harness {
    gateway: Arc<Gateway>,
    fast: Arc<ScriptedEngine>,
    full: Arc<ScriptedEngine>,
    _policy_dir: tempfile::TempDir,
}

fn harness() -> Harness {
    harness_with(vec![
        Arc::new(ScriptedEngine::new("small", "fast")),
        Arc::new(ScriptedEngine::new("big", "full")),
    ])
}

fn harness_with(engines: Vec<Arc<ScriptedEngine>>) -> Harness {
    harness_keyed(engines, &[])
}

fn harness_keyed(engines: Vec<Arc<ScriptedEngine>>, keys: &[ApiKeyConfig]) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("policy.toml");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(BUDGETS.as_bytes()))
        .expect("policy file");
    let backends: Vec<Arc<dyn Engine>> = engines
        .iter()
        .map(|e| e.clone() as Arc<dyn Engine>)
        .collect();
    let tiers = Tiers::new(backends);
    let policies = PolicyStore::load(vec![path], tiers.names()).expect("policy");
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(ReplyCache::new(
        100,
        1 << 20,
        CacheCounters {
            evictions: metrics.cache_evictions.clone(),
        },
    ));
    let gateway = Gateway::new(GatewayParts {
        tiers,
        policies: Arc::new(policies),
        admission: Admission::new(keys),
        cache,
        metrics,
    });
    let find = |tier: &str| {
        engines
            .iter()
            .find(|e| e.info().tier == tier)
            .cloned()
            .expect("engine for tier")
    };
    Harness {
        gateway: Arc::new(gateway),
        fast: find("fast"),
        full: find("full"),
        _policy_dir: dir,
    }
}

fn hinted(hint: &str) -> Caller {
    Caller {
        hint: Some(hint.to_owned()),
        ..Caller::default()
    }
}

fn greedy(prompt: &str) -> ChatRequest {
    let mut request = ChatRequest::user(prompt);
    request.sampling.temperature = 0.0;
    request
}

/// Admits `caller` and serves `request`, as the HTTP handler does.
async fn serve(h: &Harness, caller: Caller, request: ChatRequest) -> Result<Served, GatewayError> {
    let admitted = h.gateway.admit(caller)?;
    h.gateway.serve(admitted, request).await
}

/// A tier whose live state predicts a first token `seconds` away.
fn busy(seconds: f64) -> LoadSnapshot {
    LoadSnapshot {
        slots: 4,
        step_s: seconds,
        ..LoadSnapshot::default()
    }
}

/// Reads a reply to its end: the text and the last event.
async fn read_all(served: Served) -> (String, ReplyEvent) {
    let mut reply = served.reply;
    let mut text = String::new();
    loop {
        match reply.next().await.expect("a last event") {
            ReplyEvent::Text(piece) => text.push_str(&piece),
            last => return (text, last),
        }
    }
}

/// The value of one sample in the gateway's metrics (0 when absent).
fn metric(harness: &Harness, sample: &str) -> f64 {
    let rendered = harness.gateway.metrics().render();
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Lets spawned tasks (the scripted sequences, the cache's pump) run to their next wait.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_tier_predicted_to_miss_the_budget_is_skipped_before_queueing() {
    let h = harness();
    h.full.set_load(busy(3.0));
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(served.tier, "fast");
    let degraded = served.degraded.clone().expect("degraded");
    assert_eq!(degraded.reason, DegradeReason::PredictedTtft);
    assert_eq!(h.full.submitted(), 0, "nothing queued on the slow tier");
    assert_eq!(h.fast.submitted(), 1);
    let (text, last) = read_all(served).await;
    assert_eq!(text, "t0 t1 t2 t3 ");
    assert!(matches!(last, ReplyEvent::Finished(_)));
    assert_eq!(
        metric(
            &h,
            r#"tiergate_degradations_total{from="full",to="fast",reason="predicted_ttft"}"#
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_predicted_within_the_budget_serves_the_request_itself() {
    let h = harness();
    h.full.set_load(busy(1.5));
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(
        (served.tier.as_str(), served.model.as_str()),
        ("full", "big")
    );
    assert_eq!(served.degraded, None);
}

#[tokio::test(start_paused = true)]
async fn watchdog_cancels_a_silent_tier_early_enough_for_the_next_to_answer() {
    let h = harness();
    h.full
        .set_script(Script::tokens(4, Duration::from_secs(60), Duration::ZERO));
    // The fast tier's first token is predicted 100 ms away: the watchdog leaves it
    // twice that plus 50 ms, firing 250 ms before the 2 s budget ends.
    h.fast.set_load(busy(0.1));
    let started = Instant::now();
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    let ttft = started.elapsed();
    assert_eq!(served.tier, "fast");
    assert_eq!(
        served.degraded.as_ref().map(|d| d.reason),
        Some(DegradeReason::TtftWatchdog)
    );
    assert_eq!(
        ttft,
        Duration::from_millis(1750 + 10),
        "watchdog at 1750 ms, then the fast tier's first token 10 ms later"
    );
    settle().await;
    assert_eq!(h.full.live(), 0, "the silent sequence was cancelled");
    assert_eq!(h.full.submitted(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_gives_a_tier_at_least_half_the_budget() {
    let h = harness();
    h.full
        .set_script(Script::tokens(4, Duration::from_secs(60), Duration::ZERO));
    // A next tier predicted at 5 s would want the watchdog to fire at once: it is capped
    // at half of what is left, and then the fast tier is itself predicted too slow.
    h.fast.set_load(busy(5.0));
    let started = Instant::now();
    let err = serve(&h, hinted("full"), greedy("hi"))
        .await
        .err()
        .expect("shed");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert!(matches!(
        err,
        GatewayError::Budget(BudgetError::Exhausted { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_pinned_request_gets_the_whole_budget_then_a_503_naming_the_tier() {
    let h = harness();
    h.full
        .set_script(Script::tokens(4, Duration::from_secs(60), Duration::ZERO));
    let mut request = greedy("hi");
    request.model = "big".into();
    let started = Instant::now();
    let err = serve(&h, Caller::default(), request)
        .await
        .err()
        .expect("shed");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(err.http_status(), 503);
    let GatewayError::Budget(BudgetError::Exhausted {
        passed_over,
        retry_after,
        ..
    }) = &err
    else {
        panic!("expected exhausted, got {err:?}");
    };
    assert_eq!(passed_over.len(), 1, "{passed_over:?}");
    assert_eq!(passed_over[0].tier, "full");
    assert_eq!(passed_over[0].why, "no first token within 2000 ms");
    assert!(*retry_after >= Duration::from_secs(1));
    assert_eq!(h.fast.submitted(), 0, "a pinned request never degrades");
    settle().await;
    assert_eq!(h.full.live(), 0);
    assert_eq!(
        metric(
            &h,
            r#"tiergate_requests_total{model="big",tier="full",status="503",finish_reason="none"}"#
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn when_no_tier_fits_the_503_names_each_tier_and_why() {
    let h = harness();
    h.full.set_load(busy(5.0));
    h.fast.refuse_with(Some(EngineError::QueueFull {
        model: "small".into(),
        capacity: 4,
    }));
    let err = serve(&h, hinted("full"), greedy("hi"))
        .await
        .err()
        .expect("shed");
    assert_eq!(err.http_status(), 503);
    let message = err.to_string();
    assert!(
        message.contains("full: predicted first token in 5000 ms, 2000 ms left"),
        "{message}"
    );
    assert!(
        message.contains("fast: the request queue of model `small` is full (4 waiting)"),
        "{message}"
    );
    assert_eq!(metric(&h, r#"tiergate_shed_total{tier="full"}"#), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_stale_reply_is_served_when_no_tier_can_answer_in_time() {
    let h = harness();
    let first = serve(&h, hinted("cached"), greedy("what is 2+2"))
        .await
        .expect("served");
    assert_eq!(first.cache, Some(CacheUse::Miss));
    let (text, _) = read_all(first).await;
    settle().await;

    // Within the 1 s TTL: a hit, without generating.
    let hit = serve(&h, hinted("cached"), greedy("what is 2+2"))
        .await
        .expect("served");
    assert_eq!(hit.cache, Some(CacheUse::Hit));
    assert_eq!(read_all(hit).await.0, text);
    assert_eq!(h.fast.submitted(), 1);

    // Past the TTL while the tier is overloaded: the stale reply beats a 503.
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.fast.set_load(busy(10.0));
    let stale = serve(&h, hinted("cached"), greedy("what is 2+2"))
        .await
        .expect("served");
    assert_eq!(stale.cache, Some(CacheUse::Stale));
    assert_eq!(read_all(stale).await.0, text);

    // Past max_stale too: nothing left to serve.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let err = serve(&h, hinted("cached"), greedy("what is 2+2"))
        .await
        .err()
        .expect("shed");
    assert_eq!(err.http_status(), 503);
    assert_eq!(h.fast.submitted(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_total_budget_cuts_a_reply_with_length_and_cancels_its_sequence() {
    let h = harness();
    h.fast.set_script(Script::tokens(
        100,
        Duration::from_millis(100),
        Duration::from_millis(100),
    ));
    let served = serve(&h, hinted("tight-total"), greedy("write a lot"))
        .await
        .expect("served");
    let started = Instant::now();
    let (text, last) = read_all(served).await;
    let ReplyEvent::Finished(ending) = last else {
        panic!("expected an ending, got {last:?}");
    };
    assert!(ending.budget_cut);
    assert_eq!(ending.finish_reason, FinishReason::Length);
    // Pieces at 100, 200, ... ms; the budget ends at 1000 ms after acceptance.
    assert_eq!(ending.usage.completion_tokens, 9, "{text}");
    assert_eq!(started.elapsed(), Duration::from_millis(900));
    settle().await;
    assert_eq!(h.fast.live(), 0, "the cut reply's sequence left");
    assert_eq!(
        metric(&h, r#"tiergate_budget_cuts_total{tier="fast"}"#),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn identical_concurrent_requests_share_one_generation() {
    let h = harness();
    let (a, b) = tokio::join!(
        serve(&h, hinted("cached"), greedy("same question")),
        serve(&h, hinted("cached"), greedy("same question")),
    );
    let (a, b) = (a.expect("served"), b.expect("served"));
    let mut uses = [a.cache, b.cache];
    uses.sort_by_key(|u| u.map(CacheUse::as_str));
    assert_eq!(uses, [Some(CacheUse::Miss), Some(CacheUse::Shared)]);
    assert_eq!(h.fast.submitted(), 1, "one generation for both");
    let (text_a, _) = read_all(a).await;
    let (text_b, _) = read_all(b).await;
    assert_eq!(text_a, text_b);
    assert_eq!(text_a, "t0 t1 t2 t3 ");
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_leaves_cancels_the_sequence_and_counts_as_aborted() {
    let h = harness();
    h.fast.set_script(Script::tokens(
        100,
        Duration::from_millis(10),
        Duration::from_millis(100),
    ));
    let served = serve(&h, Caller::default(), greedy("hi"))
        .await
        .expect("served");
    let mut reply = served.reply;
    assert!(matches!(reply.next().await, Some(ReplyEvent::Text(_))));
    assert_eq!(h.fast.live(), 1);
    drop(reply);
    settle().await;
    assert_eq!(h.fast.live(), 0);
    assert_eq!(
        metric(
            &h,
            r#"tiergate_requests_total{model="small",tier="fast",status="client_closed",finish_reason="abort"}"#
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_after_the_first_token_is_a_stream_error_counted_once() {
    let h = harness();
    let mut script = Script::tokens(1, Duration::from_millis(10), Duration::ZERO);
    script.0.pop();
    script
        .0
        .push(Step::Fail(EngineError::Decode("device lost".into())));
    h.fast.set_script(script);
    let mut request = greedy("hi");
    request.stream = true;
    let served = serve(&h, Caller::default(), request).await.expect("served");
    let (_, last) = read_all(served).await;
    assert!(matches!(last, ReplyEvent::Failed(EngineError::Decode(_))));
    let rendered = h.gateway.metrics().render();
    let counted: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("tiergate_requests_total{"))
        .collect();
    assert_eq!(
        counted,
        [
            r#"tiergate_requests_total{model="small",tier="fast",status="stream_error",finish_reason="error"} 1"#
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn naming_the_second_model_of_a_shared_tier_is_served_by_that_model() {
    let h = harness_with(vec![
        Arc::new(ScriptedEngine::new("small-a", "fast")),
        Arc::new(ScriptedEngine::new("small-b", "fast")),
        Arc::new(ScriptedEngine::new("big", "full")),
    ]);
    let mut request = greedy("hi");
    request.model = "small-b".into();
    let served = serve(&h, Caller::default(), request).await.expect("served");
    assert_eq!(served.model, "small-b");
    assert!(served.route.pinned);
    assert_eq!(h.fast.submitted(), 0, "small-a never saw it");
}

/// Drain runs the real HTTP server on the real clock (sockets and a paused clock do not
/// mix), with replies short enough to keep it well under a second.
#[tokio::test]
async fn shutdown_lets_open_streams_finish_and_accepts_nothing_new() {
    let h = harness();
    h.fast.set_script(Script::tokens(
        5,
        Duration::from_millis(20),
        Duration::from_millis(60),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = HttpOptions {
        drain_timeout: Duration::from_secs(10),
        ..HttpOptions::new("x-tiergate-route-hint")
    };
    let server = tokio::spawn(server::serve(
        listener,
        h.gateway.clone(),
        options,
        async {
            let _ = stop_rx.await;
        },
        std::future::pending(),
    ));
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}], "stream": true
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a chunk").expect("bytes");
    assert!(first.starts_with(b"data: "));
    let _ = stop_tx.send(());
    // The next piece comes 60 ms after the signal, with three more (180 ms) still to come:
    // the server must be waiting for them, not returned.
    let mut rest = body.next().await.expect("a chunk").expect("bytes").to_vec();
    assert!(
        !server.is_finished(),
        "the server returned while a reply was still streaming"
    );
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("the stream stays open"));
    }
    let rest = String::from_utf8(rest).expect("utf-8");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let served = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops once the stream is done")
        .expect("no panic");
    assert!(served.is_ok(), "{served:?}");
    assert!(
        client.get(format!("{base}/health")).send().await.is_err(),
        "nothing listens after the drain"
    );
}

// ---- Calibrated budgets and the degrade path -------------------------------------------

/// `words` words of prompt.
fn long(words: usize) -> ChatRequest {
    greedy(&"word ".repeat(words))
}

#[tokio::test(start_paused = true)]
async fn a_prompt_that_fits_no_tier_is_a_400_not_a_503() {
    let h = harness();
    h.fast.set_context(Some(50));
    h.full.set_context(Some(100));
    let err = serve(&h, hinted("full"), long(120))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.http_status(), 400, "{err}");
    assert!(
        matches!(
            err,
            GatewayError::Budget(BudgetError::Engine(EngineError::PromptTooLong {
                context: 100,
                ..
            }))
        ),
        "the routed tier's limit is named: {err:?}"
    );
    assert_eq!(h.full.submitted() + h.fast.submitted(), 0);
    assert_eq!(metric(&h, r#"tiergate_shed_total{tier="full"}"#), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_prompt_too_large_by_its_bytes_is_refused_before_routing() {
    let h = harness();
    h.fast.set_context(Some(50));
    h.full.set_context(Some(100));
    // At most 64 bytes a token: 7 000 bytes are at least 109 tokens, past both contexts.
    let err = serve(&h, Caller::default(), greedy(&"x".repeat(7_000)))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, GatewayError::TooLarge(_)), "{err:?}");
    assert_eq!(err.http_status(), 400);
    assert_eq!(
        metric(
            &h,
            r#"tiergate_route_decisions_total{tier="fast",rule="default"}"#
        ),
        0.0,
        "refused before routing"
    );
}

#[tokio::test(start_paused = true)]
async fn degrading_never_moves_a_request_to_a_tier_it_does_not_fit() {
    let h = harness();
    // The full tier cannot hold the prompt with its max_tokens; the fast tier can.
    h.full.set_context(Some(100));
    h.fast.set_context(Some(1000));
    let mut request = long(90);
    request.max_tokens = Some(50);
    let served = serve(&h, hinted("full"), request).await.expect("served");
    assert_eq!(served.tier, "fast");
    assert_eq!(
        served.degraded.as_ref().map(|d| d.reason),
        Some(DegradeReason::ContextLength)
    );
    // And the other way round: a smaller tier too small for the prompt is skipped, so a
    // slow full tier sheds with both reasons rather than queueing where it cannot fit.
    h.full.set_context(Some(1000));
    h.fast.set_context(Some(100));
    h.full.set_load(busy(5.0));
    let mut request = long(90);
    request.max_tokens = Some(50);
    let err = serve(&h, hinted("full"), request)
        .await
        .err()
        .expect("shed");
    assert_eq!(err.http_status(), 503);
    let message = err.to_string();
    assert!(
        message.contains("fast: this model's maximum context length is 100 tokens"),
        "{message}"
    );
    assert_eq!(
        h.fast.submitted(),
        1,
        "only the first request reached the fast tier"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_that_is_down_loading_or_full_passes_the_request_down_the_path() {
    let h = harness();
    h.full.set_down(Some("the model thread panicked: boom"));
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(served.tier, "fast");
    assert_eq!(
        served.degraded.as_ref().map(|d| d.reason),
        Some(DegradeReason::Unavailable)
    );

    h.full.set_down(None);
    h.full.set_loading(true);
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(served.tier, "fast");

    h.full.set_loading(false);
    h.full.refuse_with(Some(EngineError::QueueFull {
        model: "big".into(),
        capacity: 1,
    }));
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(
        served.degraded.as_ref().map(|d| d.reason),
        Some(DegradeReason::QueueFull)
    );

    // With nothing left on the path, the 503 says why each tier was passed over.
    h.fast.set_down(Some("gone"));
    let err = serve(&h, hinted("full"), greedy("hi"))
        .await
        .err()
        .expect("shed");
    assert_eq!(err.http_status(), 503);
    let message = err.to_string();
    assert!(
        message.contains("full: the request queue of model `big` is full"),
        "{message}"
    );
    assert!(message.contains("fast: down: gone"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn predictions_are_scaled_by_how_the_tier_has_answered() {
    let h = harness();
    // The full tier predicts 0.6 s but answers in 1.5 s: after a few requests its
    // predictions are scaled up 2.5 times.
    h.full.set_load(busy(0.6));
    h.full.set_script(Script::tokens(
        1,
        Duration::from_millis(1500),
        Duration::ZERO,
    ));
    for _ in 0..3 {
        let served = serve(&h, hinted("full"), greedy("hi"))
            .await
            .expect("served");
        assert_eq!(served.tier, "full");
        read_all(served).await;
    }
    assert!(
        h.gateway
            .metrics()
            .render()
            .contains(r#"tiergate_ttft_prediction_ratio_count{tier="full"} 3"#),
        "each first token is compared with its prediction"
    );
    // 0.9 s raw fits a 2 s budget; scaled by 2.5 it does not.
    h.full.set_load(busy(0.9));
    let started = Instant::now();
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(served.tier, "fast");
    assert_eq!(
        served.degraded.as_ref().map(|d| d.reason),
        Some(DegradeReason::PredictedTtft)
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "no time spent on the full tier"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_with_a_free_slot_and_fast_answers_is_not_shed_on_a_prediction() {
    let h = harness();
    // Three quick answers: observed TTFTs well inside the 2 s budget.
    for _ in 0..3 {
        let served = serve(&h, hinted("full"), greedy("hi"))
            .await
            .expect("served");
        read_all(served).await;
    }
    // A pessimistic prediction (3 s of prompts still prefilling, more once calibrated),
    // but a free slot and no queue: the evidence wins and the request is tried.
    h.full.set_load(LoadSnapshot {
        slots: 4,
        live: 1,
        pending_prompt_tokens: 3000,
        prefill_s_per_token: 0.001,
        step_s: 0.01,
        ..LoadSnapshot::default()
    });
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(
        (served.tier.as_str(), served.degraded.clone()),
        ("full", None)
    );
    read_all(served).await;
    // With requests queued ahead, the prediction stands.
    h.full.set_load(LoadSnapshot {
        slots: 4,
        live: 4,
        waiting: 2,
        pending_prompt_tokens: 5000,
        prefill_s_per_token: 0.001,
        step_s: 0.01,
        steps_to_release: Arc::from([300, 300, 300, 300]),
        ..LoadSnapshot::default()
    });
    let served = serve(&h, hinted("full"), greedy("hi"))
        .await
        .expect("served");
    assert_eq!(served.tier, "fast");
}

/// Serves the harness over HTTP on a free port; returns the base URL and the stop signal.
async fn http(h: &Harness) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = HttpOptions {
        drain_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        max_connections: 4,
        ..HttpOptions::new("x-tiergate-route-hint")
    };
    tokio::spawn(server::serve(
        listener,
        h.gateway.clone(),
        options,
        async {
            let _ = stop_rx.await;
        },
        std::future::pending(),
    ));
    (base, stop_tx)
}

#[tokio::test]
async fn ready_is_503_naming_a_tier_that_went_down() {
    let h = harness();
    let (base, _stop) = http(&h).await;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{base}/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 200);
    h.full.set_down(Some("the model thread panicked: boom"));
    let ready = client
        .get(format!("{base}/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "down");
    assert_eq!(body["down"]["big"]["tier"], "full");
    assert_eq!(
        body["down"]["big"]["reason"],
        "the model thread panicked: boom"
    );
    assert_eq!(body["models"]["small"], true);
}

#[tokio::test]
async fn v1_route_needs_the_key_resolves_the_tenant_and_shows_no_secrets_or_paths() {
    let keys = [ApiKeyConfig {
        key: "sk-acme".into(),
        tenant: Some("acme".into()),
        requests_per_minute: Some(2),
        tokens_per_minute: None,
    }];
    let h = harness_keyed(
        vec![
            Arc::new(ScriptedEngine::new("small", "fast")),
            Arc::new(ScriptedEngine::new("big", "full")),
        ],
        &keys,
    );
    let (base, _stop) = http(&h).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
    let route = |key: Option<&'static str>| {
        let mut request = client.post(format!("{base}/v1/route")).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let anonymous = route(None).await.expect("sent");
    assert_eq!(anonymous.status(), 401);
    let explained = route(Some("sk-acme")).await.expect("sent");
    assert_eq!(explained.status(), 200);
    let text = explained.text().await.expect("body");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(json["features"]["tenant"], "acme");
    assert!(!text.contains("sk-acme"), "the key is never echoed: {text}");
    assert_eq!(json["policy"][0], "policy.toml", "no directories: {text}");
    // Two requests a minute: the explanation spent one, this spends the second, then 429.
    assert_eq!(route(Some("sk-acme")).await.expect("sent").status(), 200);
    let limited = route(Some("sk-acme")).await.expect("sent");
    assert_eq!(limited.status(), 429);
}

#[tokio::test]
async fn a_bad_key_is_refused_before_the_body_is_read() {
    let keys = [ApiKeyConfig {
        key: "sk-acme".into(),
        tenant: None,
        requests_per_minute: None,
        tokens_per_minute: None,
    }];
    let h = harness_keyed(
        vec![
            Arc::new(ScriptedEngine::new("small", "fast")),
            Arc::new(ScriptedEngine::new("big", "full")),
        ],
        &keys,
    );
    let (base, _stop) = http(&h).await;
    // Not JSON at all: a 401, not a 400, because the key is checked first.
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .body("not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn refused_requests_answer_in_the_openai_shape_and_are_counted_by_status() {
    let h = harness();
    let (base, _stop) = http(&h).await;
    let client = reqwest::Client::new();
    let not_found = client
        .get(format!("{base}/v1/nope"))
        .send()
        .await
        .expect("sent");
    assert_eq!(not_found.status(), 404);
    let body: serde_json::Value = not_found.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unknown_url");
    let wrong_method = client
        .get(format!("{base}/v1/chat/completions"))
        .send()
        .await
        .expect("sent");
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await.expect("json");
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let bad_json = client
        .post(format!("{base}/v1/chat/completions"))
        .body("{")
        .send()
        .await
        .expect("sent");
    assert_eq!(bad_json.status(), 400);
    let unknown_model = client
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &serde_json::json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(unknown_model.status(), 404);
    for (status, count) in [("404", 2.0), ("405", 1.0), ("400", 1.0)] {
        let sample = format!(
            r#"tiergate_requests_total{{model="",tier="",status="{status}",finish_reason="none"}}"#
        );
        assert_eq!(metric(&h, &sample), count, "{sample}");
    }
}

/// Joining a running generation and leading a new one are one atomic step: identical
/// requests racing on several threads start exactly one generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_requests_racing_on_threads_start_one_generation() {
    let h = harness();
    h.fast.set_script(Script::tokens(
        4,
        Duration::from_millis(50),
        Duration::from_millis(10),
    ));
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let gateway = h.gateway.clone();
    let racers = (0..16).map(|_| {
        let (gateway, barrier) = (gateway.clone(), barrier.clone());
        tokio::spawn(async move {
            let admitted = gateway.admit(hinted("cached")).expect("admitted");
            barrier.wait().await;
            let served = gateway
                .serve(admitted, greedy("the same question"))
                .await
                .expect("served");
            let cache = served.cache;
            let (text, _) = read_all(served).await;
            (cache, text)
        })
    });
    let results = futures::future::join_all(racers).await;
    assert_eq!(h.fast.submitted(), 1, "one generation for all 16");
    let led = results
        .iter()
        .filter(|r| r.as_ref().expect("task").0 == Some(CacheUse::Miss))
        .count();
    assert_eq!(led, 1);
    assert!(results
        .iter()
        .all(|r| r.as_ref().expect("task").1 == "t0 t1 t2 t3 "));
}

/// Slow or silent clients cannot hold connections: headers and bodies have deadlines, an
/// idle kept-alive connection closes, and connections beyond the cap wait to be accepted.
#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness();
    let (base, _stop) = http(&h).await;
    let address = base.trim_start_matches("http://").to_owned();
    let closed_within = |mut stream: tokio::net::TcpStream, within: Duration| async move {
        let mut buffer = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut buffer))
            .await
            .is_ok()
    };

    // Nothing sent at all: closed after the header timeout as well.
    let mute = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    assert!(
        closed_within(mute, Duration::from_secs(3)).await,
        "a mute client is cut off"
    );

    // Headers never finished: closed after the 300 ms header timeout.
    let mut silent = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    silent
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(silent, Duration::from_secs(3)).await,
        "a slow header is cut off"
    );

    // A body that never arrives: the request ends at the 300 ms body timeout.
    let mut stalled = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .expect("write");
    let mut reply = vec![0; 256];
    let read = tokio::time::timeout(Duration::from_secs(3), stalled.read(&mut reply))
        .await
        .expect("an answer before the test gives up")
        .expect("read");
    let status_line = String::from_utf8_lossy(&reply[..read]);
    assert!(status_line.starts_with("HTTP/1.1 4"), "{status_line}");

    // A kept-alive connection left idle after a response is closed too.
    let mut idle = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let read = idle.read(&mut reply).await.expect("read");
    assert!(String::from_utf8_lossy(&reply[..read]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(idle, Duration::from_secs(3)).await,
        "an idle connection is closed"
    );

    // Four connections at most: a fifth is not served while four are open.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        // Each sends a partial header, so it stays open until its header timeout.
        stream
            .write_all(b"GET /health HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(stream);
    }
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let health = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("served");
    assert_eq!(health.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "served only once the held connections timed out: {:?}",
        started.elapsed()
    );
}

/// Found by `just soak`: under load, a prompt the template refuses was shed with a 503
/// before `submit` could say it is the client's error.
#[tokio::test(start_paused = true)]
async fn a_prompt_no_template_accepts_is_a_400_even_on_an_overloaded_tier() {
    let h = harness();
    h.fast.set_load(busy(10.0));
    h.fast.refuse_with(Some(EngineError::Template(
        "a message contains a NUL byte".into(),
    )));
    h.fast.fail_counting(true);
    let err = serve(&h, Caller::default(), greedy("nul"))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.http_status(), 400, "{err}");
}
