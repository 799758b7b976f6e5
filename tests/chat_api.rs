//! End-to-end behaviour of `/v1/chat/completions` on the real llama.cpp engine and the real
//! default models, through a real HTTP server on port 0.

mod common;

use std::time::Duration;

use common::{greedy, parse_sse, read_at_least, streamed_text, user, TestServer, FAST, FULL};
use serde_json::{json, Value};

const ACTIVE_FAST: &str = r#"tiergate_active_sequences{model="smollm2-135m-instruct",tier="fast"}"#;
const BATCH_MAX_FAST: &str =
    r#"tiergate_batch_sequences_max{model="smollm2-135m-instruct",tier="fast"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn streaming_at_temperature_zero_concatenates_to_the_non_streaming_text() {
    let server = TestServer::both().await;
    for model in [FAST, FULL] {
        let body = greedy(model, "Name three colours of the rainbow.", 40);
        let whole = server.complete(body.clone()).await;
        let expected = whole["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert!(!expected.is_empty(), "{model} generated nothing: {whole}");
        let streamed = streamed_text(&server.stream(body).await);
        assert_eq!(streamed, expected, "{model}");
        assert_eq!(whole["model"], model);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_chunk_has_the_openai_shape_and_done_ends_the_stream() {
    let server = TestServer::fast().await;
    let mut body = greedy("auto", "Say hello.", 16);
    body["stream_options"] = json!({"include_usage": true});
    let payloads = server.stream(body).await;

    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk is JSON"))
        .collect();
    assert!(
        chunks.len() >= 3,
        "role, content and finish chunks expected: {chunks:?}"
    );
    let id = chunks[0]["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk["created"].as_u64().expect("created") > 1_600_000_000);
        assert_eq!(chunk["model"], FAST);
        assert!(
            chunk.get("usage").is_some(),
            "include_usage puts usage in every chunk"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["index"], 0);

    let (usage_chunk, choice_chunks) = chunks.split_last().expect("chunks");
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    assert!(usage["prompt_tokens"].as_u64().expect("prompt") > 0);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0)
        )
    );

    let (last, content) = choice_chunks.split_last().expect("finish chunk");
    let reason = last["choices"][0]["finish_reason"]
        .as_str()
        .expect("finish reason");
    assert!(reason == "stop" || reason == "length", "{reason}");
    for chunk in content {
        assert!(chunk["choices"][0]["finish_reason"].is_null());
        assert!(chunk["usage"].is_null());
    }
    assert!(content[1..]
        .iter()
        .all(|c| c["choices"][0]["delta"]["content"].is_string()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_streams_complete_in_shared_decode_steps() {
    let server = TestServer::fast().await;
    let topics = [
        "cats", "rivers", "bread", "stars", "trains", "music", "snow", "chess",
    ];
    let requests = topics.iter().map(|topic| {
        let body = json!({
            "messages": user(&format!("Write two sentences about {topic}.")),
            "temperature": 0.7, "seed": 7, "max_tokens": 48
        });
        server.stream(body)
    });
    let replies = futures::future::join_all(requests).await;
    for payloads in &replies {
        assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
        assert!(!streamed_text(payloads).is_empty());
    }
    let batched = server.metric(BATCH_MAX_FAST).await.expect("batch metric");
    assert!(
        batched > 1.0,
        "sequences were never decoded together (max {batched})"
    );
    server
        .wait_for_metric(ACTIVE_FAST, 0.0, Duration::from_secs(5))
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_frees_its_sequence_and_the_next_request_is_served() {
    let server = TestServer::fast().await;
    let body = json!({
        "messages": user("Count from 1 to 2000, separated by commas."),
        "temperature": 0, "max_tokens": 1000, "stream": true,
        // Only max_tokens (1000 tokens: several seconds) or the disconnect can end it.
        "ignore_eos": true
    });
    let resp = server.post_chat(&body).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let seen = read_at_least(&mut body, 400).await;
    assert!(
        seen.len() >= 400,
        "stream ended early: {}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(
        server.metric(ACTIVE_FAST).await,
        Some(1.0),
        "the sequence should still be generating"
    );
    drop(body); // the client goes away mid-stream

    server
        .wait_for_metric(ACTIVE_FAST, 0.0, Duration::from_secs(3))
        .await;
    let reply = server.complete(greedy("auto", "Say yes.", 8)).await;
    assert!(reply["usage"]["completion_tokens"].as_u64().expect("usage") > 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_tokens_ends_with_length_and_exact_usage() {
    let server = TestServer::fast().await;
    for (field, n) in [("max_tokens", 5), ("max_completion_tokens", 9)] {
        let reply = server
            .complete(json!({"messages": user("Write a long essay about the sea."), "temperature": 0, field: n}))
            .await;
        assert_eq!(reply["choices"][0]["finish_reason"], "length", "{field}");
        assert_eq!(reply["usage"]["completion_tokens"], n, "{field}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_string_ends_generation_before_the_stop_text() {
    let server = TestServer::fast().await;
    let body = greedy("auto", "List the days of the week, one per line.", 60);
    let reference = server.complete(body.clone()).await;
    let text = reference["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_owned();
    // A stop string taken from the middle of the reply, at its first occurrence.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 12, "reply too short to cut: {text:?}");
    let (stop, at) = (chars.len() / 2..chars.len() - 4)
        .find_map(|start| {
            let candidate: String = chars[start..start + 4].iter().collect();
            let first = text.find(&candidate)?;
            (first > 0).then_some((candidate, first))
        })
        .expect("some 4-character substring");

    for stop_field in [json!(stop), json!(["never-appears", stop])] {
        let mut with_stop = body.clone();
        with_stop["stop"] = stop_field;
        let reply = server.complete(with_stop.clone()).await;
        assert_eq!(reply["choices"][0]["message"]["content"], text[..at]);
        assert_eq!(reply["choices"][0]["finish_reason"], "stop");
        assert_eq!(streamed_text(&server.stream(with_stop).await), text[..at]);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn multibyte_characters_stream_without_replacement_characters() {
    let server = TestServer::fast().await;
    let body = greedy(
        "auto",
        "Repeat exactly, nothing else: 你好，世界！🦀🚀 こんにちは 😀",
        40,
    );
    let payloads = server.stream(body.clone()).await;
    let text = streamed_text(&payloads);
    assert!(
        !text.contains('\u{fffd}'),
        "replacement character in {text:?}"
    );
    assert!(
        text.chars().any(|c| c.len_utf8() > 1),
        "the reply has no multi-byte character to test: {text:?}"
    );
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).expect("json");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            assert!(
                !piece.contains('\u{fffd}'),
                "chunk split a character: {piece:?}"
            );
        }
    }
    let whole = server.complete(body).await;
    assert_eq!(whole["choices"][0]["message"]["content"], text);
    server.stop().await;
}

/// One bad request and what must come back.
struct BadInput {
    name: &'static str,
    body: String,
    status: u16,
    param: Option<&'static str>,
    code: Option<&'static str>,
    message_contains: &'static [&'static str],
}

fn bad(
    name: &'static str,
    body: impl Into<String>,
    status: u16,
    param: Option<&'static str>,
) -> BadInput {
    BadInput {
        name,
        body: body.into(),
        status,
        param,
        code: None,
        message_contains: &[],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_an_openai_error_with_the_right_status() {
    const CONTEXT: u32 = 512;
    const BODY_LIMIT: usize = 64 * 1024;
    let server = TestServer::start(|config| {
        common::only_fast_tier(config);
        // Split KV: each of the 2 slots owns CONTEXT cells.
        config.models[0].slots = 2;
        config.models[0].n_ctx = 2 * CONTEXT;
        config.server.body_limit_bytes = BODY_LIMIT;
    })
    .await;
    let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
    let long_prompt = "word ".repeat(2000);
    let cases = vec![
        bad("malformed json", r#"{"messages": [ "#, 400, None),
        bad(
            "wrong type",
            format!(r#"{{{msg},"temperature":"hot"}}"#),
            400,
            Some("temperature"),
        ),
        bad("missing messages", r#"{"model":"auto"}"#, 400, None),
        bad(
            "empty messages",
            r#"{"messages":[]}"#,
            400,
            Some("messages"),
        ),
        bad(
            "unknown role",
            r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
            400,
            Some("messages[0].role"),
        ),
        bad(
            "max_tokens zero",
            format!(r#"{{{msg},"max_tokens":0}}"#),
            400,
            Some("max_tokens"),
        ),
        BadInput {
            code: Some("context_length_exceeded"),
            message_contains: &["512"],
            ..bad(
                "max_tokens beyond context",
                format!(r#"{{{msg},"max_tokens":100000}}"#),
                400,
                Some("max_tokens"),
            )
        },
        bad(
            "temperature too high",
            format!(r#"{{{msg},"temperature":3}}"#),
            400,
            Some("temperature"),
        ),
        bad(
            "top_p zero",
            format!(r#"{{{msg},"top_p":0}}"#),
            400,
            Some("top_p"),
        ),
        bad("n above 16", format!(r#"{{{msg},"n":17}}"#), 400, Some("n")),
        bad(
            "tools",
            format!(r#"{{{msg},"tools":[{{"type":"function","function":{{"name":"f"}}}}]}}"#),
            400,
            Some("tools"),
        ),
        bad(
            "top_logprobs out of range",
            format!(r#"{{{msg},"logprobs":true,"top_logprobs":25}}"#),
            400,
            Some("top_logprobs"),
        ),
        bad(
            "unknown response format",
            format!(r#"{{{msg},"response_format":{{"type":"xml"}}}}"#),
            400,
            Some("response_format"),
        ),
        bad(
            "image part",
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            400,
            Some("messages[0].content[0]"),
        ),
        BadInput {
            code: Some("model_not_found"),
            ..bad(
                "unknown model",
                format!(r#"{{{msg},"model":"gpt-9"}}"#),
                404,
                Some("model"),
            )
        },
        BadInput {
            code: Some("request_too_large"),
            ..bad(
                "body over limit",
                format!(
                    r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
                    "a".repeat(BODY_LIMIT)
                ),
                413,
                None,
            )
        },
        BadInput {
            code: Some("context_length_exceeded"),
            message_contains: &["512"],
            ..bad(
                "prompt longer than context",
                format!(r#"{{"messages":[{{"role":"user","content":"{long_prompt}"}}]}}"#),
                400,
                Some("messages"),
            )
        },
    ];

    for case in cases {
        let resp = server
            .client
            .post(server.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(case.body.clone())
            .send()
            .await
            .expect("sent");
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: error body is not JSON: {e}", case.name));
        assert_eq!(status, case.status, "{}: {body}", case.name);
        let error = &body["error"];
        let message = error["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no message in {body}", case.name));
        assert!(!message.is_empty(), "{}", case.name);
        assert!(error["type"].is_string(), "{}: {body}", case.name);
        assert_eq!(error["param"].as_str(), case.param, "{}: {body}", case.name);
        if let Some(code) = case.code {
            assert_eq!(error["code"], code, "{}: {body}", case.name);
        }
        for needle in case.message_contains {
            assert!(
                message.contains(needle),
                "{}: {message:?} lacks {needle}",
                case.name
            );
        }
    }
    // The prompt-too-long message carries both numbers: the prompt's tokens and the context.
    let resp = server
        .post_chat(&json!({"messages": user(&long_prompt)}))
        .await;
    let body: Value = resp.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    let numbers: Vec<u64> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        numbers.contains(&u64::from(CONTEXT)) && numbers.iter().any(|&n| n > u64::from(CONTEXT)),
        "{message}"
    );

    // Nothing leaked: no sequence holds a slot, and the server still answers.
    server
        .wait_for_metric(ACTIVE_FAST, 0.0, Duration::from_secs(5))
        .await;
    server.complete(greedy("auto", "Hi", 4)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_kv_cache_defers_admission_instead_of_failing() {
    // One shared pool of 256 cells: a request reserving prompt + 150 tokens leaves no room
    // for a second one, although 4 slots are free.
    let server = TestServer::start(|config| {
        common::only_fast_tier(config);
        config.models[0].n_ctx = 256;
        config.models[0].slots = 4;
        config.models[0].kv_unified = true;
    })
    .await;
    let requests = (0..4).map(|i| {
        server.complete(json!({
            "messages": user(&format!("Count from {i} upwards.")),
            "temperature": 0, "max_tokens": 150
        }))
    });
    for reply in futures::future::join_all(requests).await {
        let reason = reply["choices"][0]["finish_reason"]
            .as_str()
            .expect("reason");
        assert!(reason == "stop" || reason == "length");
        assert!(reply["usage"]["completion_tokens"].as_u64().expect("usage") <= 150);
    }
    assert_eq!(
        server.metric(BATCH_MAX_FAST).await,
        Some(1.0),
        "admission must wait for free cells"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn models_health_ready_and_metrics_endpoints_answer() {
    let server = TestServer::both().await;
    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["auto", FAST, FULL]);
    for path in ["/health", "/ready"] {
        let resp = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect(path);
        assert_eq!(resp.status(), 200, "{path}");
    }
    // A tier name routes to its model.
    let reply = server.complete(greedy("full", "Hi", 4)).await;
    assert_eq!(reply["model"], FULL);
    let text = server.metrics().await;
    for name in [
        "tiergate_active_sequences",
        "tiergate_waiting_requests",
        "tiergate_batch_sequences_max",
    ] {
        assert!(
            text.contains(&format!("{name}{{model=\"{FULL}\",tier=\"full\"}}")),
            "{name} missing:\n{text}"
        );
    }
    let unknown = server
        .client
        .get(server.url("/v2/nothing"))
        .send()
        .await
        .expect("404");
    assert_eq!(unknown.status(), 404);
    server.stop().await;
}

#[test]
fn sse_parser_rejects_lines_without_data_prefix() {
    let result = std::panic::catch_unwind(|| parse_sse("data:{}\n\n"));
    assert!(result.is_err(), "`data:` without a space must be caught");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_fails_to_load_stops_startup_with_its_reason() {
    type BreakModel = fn(&mut tiergate::config::ModelConfig);
    let cases: [(&str, BreakModel); 2] = [
        ("not found", |m| {
            m.path = m.path.with_file_name("missing.gguf")
        }),
        ("chat template", |m| {
            m.chat_template = Some("no-such-template".into())
        }),
    ];
    for (reason, break_model) in cases {
        let mut config = common::shipped_config();
        common::only_fast_tier(&mut config);
        break_model(&mut config.models[0]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            tiergate::server::run(listener, config, std::future::pending()),
        )
        .await
        .expect("start-up must fail, not hang");
        let err = outcome.expect_err("a broken model must stop start-up");
        let message = format!("{err:#}");
        assert!(
            message.contains(FAST) && message.contains(reason),
            "{message}"
        );
    }
}

/// `queue_capacity` bounds the requests waiting for a slot, wherever they wait: the step
/// loop used to drain its channel into an unbounded list, so the bound never held.
#[tokio::test(flavor = "multi_thread")]
async fn queue_capacity_bounds_the_requests_waiting_for_a_slot() {
    let server = TestServer::start(|config| {
        common::only_fast_tier(config);
        let fast = &mut config.models[0];
        fast.slots = 1;
        fast.n_ctx = 2048;
        fast.queue_capacity = 1;
    })
    .await;
    let long = json!({
        "messages": user("Count from 1 to 2000."), "temperature": 0,
        "max_tokens": 400, "stream": true, "ignore_eos": true
    });
    // One request holds the only slot...
    let first = server.post_chat(&long).await;
    assert_eq!(first.status(), 200);
    let mut first = first.bytes_stream();
    read_at_least(&mut first, 200).await;
    // ...one waits in the queue (its headers come with its first token, so it is sent
    // from a task and left waiting)...
    let waiting = {
        let server_client = server.client.clone();
        let url = server.url("/v1/chat/completions");
        let body = greedy("auto", "Say yes.", 4);
        tokio::spawn(async move { server_client.post(url).json(&body).send().await })
    };
    server
        .wait_for_metric(
            r#"tiergate_waiting_requests{model="smollm2-135m-instruct",tier="fast"}"#,
            1.0,
            Duration::from_secs(5),
        )
        .await;
    // ...and the next finds the queue full: 503 with Retry-After, at once.
    let refused = server.post_chat(&greedy("auto", "Say no.", 4)).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.expect("json");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("is full")),
        "{error}"
    );
    drop(first);
    let waited = waiting.await.expect("task").expect("response");
    assert_eq!(waited.status(), 200);
    server.stop().await;
}
