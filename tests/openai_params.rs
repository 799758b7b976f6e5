//! What applications send beyond messages, on the real engine: `response_format` schemas
//! enforced by llama.cpp's grammar sampler, `logprobs`, `logit_bias`, and the 400s that
//! name what is still refused.

mod common;

use common::{fixture, streamed_text, TestServer, FAST};
use futures::{stream, StreamExt};
use serde_json::{json, Value};
use tiergate::chat::ReplyFormat;
use tiergate::engine::grammar::Grammars;
use tiergate::engine::prompt::Prompter;

/// Slots per model on a test server (see `TestServer::launch`).
const SLOTS: usize = 8;

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// A form an extraction app fills: nested object, enum, bounded integer, array, optional
/// field and no extra keys. Bounded so a reply fits in `max_tokens`.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": false
            },
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "role", "address"],
        "additionalProperties": false
    })
}

fn schema_format(schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": schema}})
}

/// The reply's text, streamed or not, and its finish reason.
async fn reply(server: &TestServer, body: Value, stream: bool) -> (String, String) {
    if stream {
        let payloads = server.stream(body).await;
        let finish = payloads
            .iter()
            .filter_map(|p| serde_json::from_str::<Value>(p).ok())
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned))
            .next_back()
            .expect("a finish reason");
        (streamed_text(&payloads), finish)
    } else {
        let json = server.complete(body).await;
        let choice = &json["choices"][0];
        (
            choice["message"]["content"]
                .as_str()
                .expect("content")
                .to_owned(),
            choice["finish_reason"].as_str().expect("finish").to_owned(),
        )
    }
}

/// Seeded samples at temperature 1, half streamed: every reply parses and validates.
async fn every_sample_validates(server: &TestServer, model: &str, samples: u64) {
    let schema = person_schema();
    let validator = jsonschema::validator_for(&schema).expect("the test schema is valid");
    // As many at once as the test server has slots: they share decode steps, and no
    // request waits long enough for the budget planner to shed it.
    let replies: Vec<(String, String)> = stream::iter(0..samples)
        .map(|seed| {
            let body = json!({
                "model": model,
                "messages": user("Make up a user record for a small team's wiki."),
                "temperature": 1.0, "top_k": 0, "seed": seed, "max_tokens": 200,
                "response_format": schema_format(&schema),
            });
            reply(server, body, seed % 2 == 0)
        })
        .buffered(SLOTS)
        .collect()
        .await;
    let mut distinct = std::collections::HashSet::new();
    for (seed, (text, finish)) in replies.into_iter().enumerate() {
        assert_eq!(finish, "stop", "seed {seed} ran out of tokens: {text}");
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("seed {seed} on {model}: not JSON ({e}): {text}"));
        if let Err(err) = validator.validate(&value) {
            panic!("seed {seed} on {model}: {err}: {text}");
        }
        distinct.insert(text);
    }
    // Temperature 1 over the whole vocabulary (top_k 0): the grammar constrains, it
    // does not collapse the samples to one reply.
    assert!(
        distinct.len() > 1,
        "all {samples} samples on {model} were equal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_replies_validate_on_both_tiers_at_temperature_one() {
    let server = TestServer::start(|config| {
        config.router.policies = vec![fixture("pinned-tiers.toml")];
    })
    .await;
    every_sample_validates(&server, "fast", 24).await;
    every_sample_validates(&server, "full", 8).await;

    // Properties come in the order the schema lists them (llama.cpp's grammar follows
    // it), not sorted: "reason first, then answer" schemas depend on that.
    let ordered = json!({"type": "object", "properties": {
        "reasoning": {"type": "string", "maxLength": 40},
        "answer": {"type": "integer"}}, "required": ["reasoning", "answer"]});
    let body = json!({
        "model": "fast", "messages": user("What is 2 + 3? Think first."),
        "temperature": 0, "max_tokens": 120, "response_format": schema_format(&ordered),
    });
    let (text, _) = reply(&server, body, false).await;
    let (reasoning, answer) = (text.find("\"reasoning\""), text.find("\"answer\""));
    assert!(reasoning.is_some() && reasoning < answer, "{text}");

    // json_object: any object, and only an object.
    for stream in [false, true] {
        let body = json!({
            "model": "fast", "messages": user("List three fruits."),
            "temperature": 1.0, "seed": 5, "max_tokens": 200,
            "response_format": {"type": "json_object"},
        });
        let (text, finish) = reply(&server, body, stream).await;
        assert_eq!(finish, "stop", "{text}");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(value.is_object(), "{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_schemas_and_bad_parameters_are_400s_that_name_them() {
    let server = TestServer::fast().await;
    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}),
            "response_format",
            "not a valid JSON Schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}}),
            "response_format",
            "missing",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
            "schema` is required",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}),
            "response_format",
            "must be a JSON object",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "yaml",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "ignore_eos": true}),
            "ignore_eos",
            "cannot be combined",
        ),
        (
            json!({"logit_bias": {"99999999": -100}}),
            "logit_bias",
            "token ids 0 to",
        ),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias", "token ids"),
        (
            json!({"logit_bias": {"5": 101}}),
            "logit_bias",
            "-100 to 100",
        ),
        (
            json!({"logit_bias": {"5": 1, "05": 2}}),
            "logit_bias",
            "more than once",
        ),
        (
            json!({"tool_choice": "auto"}),
            "tool_choice",
            "only allowed when `tools`",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "between 0 and 20",
        ),
        (
            json!({"top_logprobs": 3}),
            "top_logprobs",
            "needs `logprobs`",
        ),
        (json!({"n": 99}), "n", "between 1 and 16"),
        // Tiers tiergate hosts itself cannot call tools.
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
            "not supported",
        ),
    ];
    for (extra, param, says) in cases {
        let mut body = json!({"model": "fast", "messages": user("hi"), "max_tokens": 4});
        for (key, value) in extra.as_object().expect("object") {
            body[key] = value.clone();
        }
        let resp = server.post_chat(&body).await;
        let status = resp.status();
        let error: Value = resp.json().await.expect("json");
        assert_eq!(status, 400, "{extra}: {error}");
        assert_eq!(error["error"]["param"], param, "{extra}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        let message = error["error"]["message"].as_str().expect("message");
        assert!(message.contains(says), "{extra}: {message}");
    }
    // The engine is untouched by refused requests: a plain one still works.
    let ok = server
        .complete(json!({"model": "fast", "messages": user("hi"), "max_tokens": 2}))
        .await;
    assert_eq!(ok["choices"][0]["finish_reason"], "length");
    server.stop().await;
}

/// Each token's `top_logprobs`, checked at temperature 0: the chosen token is the most
/// likely one, and the tokens spell the content.
fn check_greedy_logprobs(entries: &[Value], content: &str, top: usize) {
    assert!(!entries.is_empty(), "no logprobs for {content:?}");
    let mut spelled = Vec::new();
    for entry in entries {
        let logprob = entry["logprob"].as_f64().expect("logprob");
        assert!(logprob <= 0.0, "{entry}");
        let alternatives = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(alternatives.len(), top, "{entry}");
        let best = alternatives
            .iter()
            .map(|a| a["logprob"].as_f64().expect("logprob"))
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (logprob - best).abs() < 1e-6,
            "greedy chose {entry} but a likelier alternative exists"
        );
        assert_eq!(alternatives[0]["token"], entry["token"], "{entry}");
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect();
        spelled.extend(bytes);
    }
    assert_eq!(String::from_utf8_lossy(&spelled), content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_consistent_streaming_or_not() {
    let server = TestServer::fast().await;
    let body = json!({
        "model": "fast", "messages": user("Name a color."), "temperature": 0,
        "max_tokens": 12, "logprobs": true, "top_logprobs": 5,
    });
    let json = server.complete(body.clone()).await;
    let choice = &json["choices"][0];
    let content = choice["message"]["content"].as_str().expect("content");
    let entries = choice["logprobs"]["content"].as_array().expect("content");
    check_greedy_logprobs(entries, content, 5);
    assert_eq!(
        entries.len() as u64,
        json["usage"]["completion_tokens"].as_u64().expect("usage"),
        "one entry per generated token (no end-of-generation token was sampled in 12)"
    );

    let payloads = server.stream(body).await;
    let mut streamed = Vec::new();
    for payload in payloads.iter().filter(|p| *p != "[DONE]") {
        let chunk: Value = serde_json::from_str(payload).expect("chunk");
        let choice = &chunk["choices"][0];
        let text = choice["delta"]["content"].as_str().unwrap_or_default();
        let pieces = choice["logprobs"]["content"].as_array();
        // Every chunk with text carries the logprobs of the tokens it holds.
        if !text.is_empty() {
            assert!(pieces.is_some_and(|p| !p.is_empty()), "{payload}");
        }
        streamed.extend(pieces.into_iter().flatten().cloned());
    }
    assert_eq!(
        streamed_text(&payloads),
        content,
        "greedy: same reply streamed"
    );
    check_greedy_logprobs(&streamed, content, 5);
    assert_eq!(&streamed, entries);

    // Without `logprobs` the field is null, as OpenAI sends it.
    let plain = server
        .complete(json!({"model": "fast", "messages": user("Name a color."), "max_tokens": 2}))
        .await;
    assert!(plain["choices"][0]["logprobs"].is_null());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_token_never_appears() {
    let server = TestServer::fast().await;
    let body = json!({
        "model": "fast", "messages": user("Say hello to the world."), "temperature": 0,
        "max_tokens": 16, "logprobs": true,
    });
    let greedy = server.complete(body.clone()).await;
    let first = greedy["choices"][0]["logprobs"]["content"][0].clone();
    let first_bytes: Vec<u8> = serde_json::from_value(first["bytes"].clone()).expect("bytes");
    // The id of the token greedy decoding picks first, from the model's own vocabulary.
    let config = common::shipped_config();
    let model = config.models.iter().find(|m| m.id == FAST).expect("fast");
    let prompter = Prompter::load_vocab(model).expect("vocab");
    let vocab = prompter.model().vocab();
    let banned: Vec<i32> = vocab
        .tokens()
        .filter(|&t| vocab.token_to_piece(t, true, None) == first_bytes)
        .map(|t| t.0)
        .collect();
    assert_eq!(banned.len(), 1, "one token spells {first}");

    let mut biased = body.clone();
    biased["logit_bias"] = json!({ banned[0].to_string(): -100 });
    let reply = server.complete(biased).await;
    let entries = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs");
    assert!(!entries.is_empty());
    for entry in entries {
        let bytes: Vec<u8> = serde_json::from_value(entry["bytes"].clone()).expect("bytes");
        assert_ne!(bytes, first_bytes, "the banned token appeared: {reply}");
    }
    // A positive bias does the opposite: the biased token is picked at every step.
    let mut forced = body;
    forced["max_tokens"] = json!(3);
    forced["logit_bias"] = json!({ banned[0].to_string(): 100 });
    let reply = server.complete(forced).await;
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert_eq!(text, String::from_utf8_lossy(&first_bytes).repeat(3));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_replies_never_answer_a_different_format() {
    let server = TestServer::start(|config| {
        config.models.retain(|m| m.id == FAST);
        config.router.policies = vec![fixture("semantic-fast.toml")];
    })
    .await;
    let ask = |format: Option<Value>| {
        let mut body = json!({
            "model": "fast", "messages": user("What is the capital of France?"),
            "temperature": 0, "max_tokens": 40,
        });
        if let Some(format) = format {
            body["response_format"] = format;
        }
        body
    };
    let cache_use = |resp: &reqwest::Response| {
        resp.headers()
            .get("x-tiergate-cache")
            .map(|v| v.to_str().expect("ascii").to_owned())
    };
    let text = server.post_chat(&ask(None)).await;
    assert_eq!(cache_use(&text).as_deref(), Some("miss"));
    let again = server.post_chat(&ask(None)).await;
    assert_eq!(cache_use(&again).as_deref(), Some("hit"));

    // Same words, a schema now: neither the exact nor the semantic cache may answer.
    let object = ask(Some(json!({"type": "json_object"})));
    let resp = server.post_chat(&object).await;
    assert_eq!(cache_use(&resp).as_deref(), Some("miss"));
    let json: Value = resp.json().await.expect("json");
    let content = json["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    // The grammar's first character; the cached text reply starts otherwise.
    assert!(content.starts_with('{'), "{content}");
    let schema = ask(Some(schema_format(&person_schema())));
    assert_eq!(
        cache_use(&server.post_chat(&schema).await).as_deref(),
        Some("miss")
    );
    // The same format again is the same request.
    assert_eq!(
        cache_use(&server.post_chat(&object).await).as_deref(),
        Some("hit")
    );
    server.stop().await;
}

#[test]
fn each_schema_compiles_once() {
    let config = common::shipped_config();
    let model = config.models.iter().find(|m| m.id == FAST).expect("fast");
    let prompter = Prompter::load_vocab(model).expect("vocab");
    let grammars = Grammars::default();
    let person = ReplyFormat::JsonSchema {
        name: "person".into(),
        schema: person_schema().to_string().into(),
        strict: None,
    };
    let first = grammars
        .for_format(&person, prompter.model())
        .expect("compiles");
    let again = grammars
        .for_format(&person, prompter.model())
        .expect("kept");
    assert!(first.is_some());
    assert_eq!(first, again);
    assert_eq!(grammars.compiles(), 1);
    assert_eq!(
        grammars.for_format(&ReplyFormat::Text, prompter.model()),
        Ok(None)
    );
    // A schema llama.cpp cannot convert is refused once and remembered as refused.
    let unsupported = ReplyFormat::JsonSchema {
        name: "x".into(),
        schema: r#"{"$ref":"https://example.com/remote.json"}"#.into(),
        strict: None,
    };
    assert!(grammars.for_format(&unsupported, prompter.model()).is_err());
    assert!(grammars.for_format(&unsupported, prompter.model()).is_err());
    assert_eq!(grammars.compiles(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_share_one_prefill_and_count_in_usage() {
    let server = TestServer::fast().await;
    let ask = |n: u32, temperature: f64, stream: bool| {
        json!({
            "model": "fast", "messages": user("Name a fruit and say why you like it."),
            "n": n, "temperature": temperature, "top_k": 0, "seed": 11, "max_tokens": 24,
            "stream": stream, "stream_options": {"include_usage": true},
        })
    };
    let texts = |reply: &Value| -> Vec<String> {
        reply["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| c["message"]["content"].as_str().expect("text").to_owned())
            .collect()
    };
    let single = server.complete(ask(1, 0.0, false)).await;
    let greedy = server.complete(ask(3, 0.0, false)).await;
    let choices = greedy["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (index, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], index);
    }
    // Greedy: every choice is the reply a single request gets.
    assert_eq!(texts(&greedy), vec![texts(&single)[0].clone(); 3]);
    let usage = &greedy["usage"];
    assert_eq!(usage["prompt_tokens"], single["usage"]["prompt_tokens"]);
    assert_eq!(
        usage["completion_tokens"].as_u64(),
        single["usage"]["completion_tokens"].as_u64().map(|n| 3 * n),
    );

    // Temperature 1: each choice draws with its own seed.
    let sampled = server.complete(ask(3, 1.0, false)).await;
    let drawn = texts(&sampled);
    assert!(drawn[0] != drawn[1] || drawn[1] != drawn[2], "{drawn:?}");
    let per_choice: u64 = 3 * 24;
    assert!(sampled["usage"]["completion_tokens"].as_u64() <= Some(per_choice));

    // Streamed: chunks carry their choice's index; the usage chunk adds them up.
    let payloads = server.stream(ask(3, 1.0, true)).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk"))
        .collect();
    let mut streamed = vec![String::new(); 3];
    let mut finished = 0;
    for chunk in &chunks {
        if let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) {
            let index = choice["index"].as_u64().expect("index") as usize;
            streamed[index].push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            finished += usize::from(choice["finish_reason"].is_string());
        }
    }
    assert_eq!(finished, 3, "one finish per choice");
    assert_eq!(streamed, drawn, "same seeds, same choices, streamed or not");
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(usage, &sampled["usage"]);

    // More choices than the model has slots: a 400 naming `n`, before anything queues.
    let resp = server.post_chat(&ask(9, 0.0, false)).await;
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.expect("json");
    assert_eq!(error["error"]["param"], "n", "{error}");

    // A client that leaves mid-stream frees every choice's sequence.
    let mut long = ask(4, 1.0, true);
    long["max_tokens"] = json!(400);
    long["ignore_eos"] = json!(true);
    let resp = server.post_chat(&long).await;
    let mut body = resp.bytes_stream();
    let _ = body.next().await;
    let active = format!(r#"tiergate_active_sequences{{model="{FAST}",tier="fast"}}"#);
    assert_eq!(server.metric(&active).await, Some(4.0), "every choice runs");
    drop(body);
    server
        .wait_for_metric(&active, 0.0, std::time::Duration::from_secs(10))
        .await;
    server.stop().await;
}
