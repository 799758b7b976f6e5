//! Reusing a finished sequence's KV cells for a prompt that starts the same way, on the
//! real fast model.

mod common;

use std::time::Duration;

use common::{TestServer, FAST};
use serde_json::{json, Value};

/// The numbers appear in the text in order: a sound count, whatever its format.
fn counts(text: &str, numbers: std::ops::RangeInclusive<u32>) -> bool {
    let mut rest = text;
    numbers
        .into_iter()
        .all(|n| match rest.find(&n.to_string()) {
            Some(at) => {
                rest = &rest[at + n.to_string().len()..];
                true
            }
            None => false,
        })
}

fn system_prompt() -> String {
    "You are a careful assistant for a shipping company. Answer briefly and politely. ".repeat(12)
}

/// Greedy, so a reply that loses its place shows; each call a different `max_tokens`, so
/// the reply cache (which serves repeated greedy requests) stays out of the way.
fn chat(messages: Value, max_tokens: u32) -> Value {
    json!({"model": "auto", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test]
async fn a_repeated_prefix_is_not_prefilled_again_and_replies_stay_sound() {
    let server = TestServer::start(|config| {
        common::only_fast_tier(config);
        for model in &mut config.models {
            model.prefix_cache = true;
        }
    })
    .await;
    let reused = format!(r#"tiergate_prefix_cache_tokens_total{{model="{FAST}",tier="fast"}}"#);
    let free = format!(r#"tiergate_free_slots{{model="{FAST}",tier="fast"}}"#);
    let system = json!({"role": "system", "content": system_prompt()});
    let count = json!({"role": "user", "content": "Count from 1 to 10, separated by commas."});

    // 1. A cold slot: everything is prefilled.
    let first = server.complete(chat(json!([system, count]), 24)).await;
    let prompt_tokens = first["usage"]["prompt_tokens"].as_f64().expect("usage");
    assert!(prompt_tokens > 150.0, "{first}");
    assert_eq!(server.metric(&reused).await, Some(0.0));
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    server
        .wait_for_metric(&free, 8.0, Duration::from_secs(5))
        .await;

    // 2. The same prompt again: all but the last token come from the slot's cells. The
    //    reply is still a count, which a model reading misplaced cells would not produce.
    let second = server.complete(chat(json!([system, count]), 25)).await;
    assert_eq!(server.metric(&reused).await, Some(prompt_tokens - 1.0));
    // Clients see it the way OpenAI reports cached prompt tokens.
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_f64();
    assert_eq!(cached, Some(prompt_tokens - 1.0), "{second}");
    let text = second["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(counts(text, 1..=5), "{text}");
    server
        .wait_for_metric(&free, 8.0, Duration::from_secs(5))
        .await;

    // 3. The next turn of the conversation resends the history: the system prompt and
    //    first question are reused, only the new part is prefilled.
    let before = server.metric(&reused).await.unwrap_or(0.0);
    let next_turn = json!([
        system,
        count,
        {"role": "assistant", "content": text},
        {"role": "user", "content": "Now count from 11 to 15, separated by commas."},
    ]);
    let third = server.complete(chat(next_turn, 26)).await;
    let gained = server.metric(&reused).await.unwrap_or(0.0) - before;
    assert!(
        gained >= prompt_tokens - 10.0,
        "reused {gained} of a {prompt_tokens}-token history"
    );
    let text = third["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(counts(text, 11..=13), "{text}");
    server.stop().await;
}
