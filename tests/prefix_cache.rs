//! Reusing a finished sequence's KV cells for a prompt that starts the same way, on the
//! real fast model.

mod common;

use std::time::Duration;

use common::{TestServer, FAST, FULL};
use serde_json::{json, Value};
use tiergate::config::Config;

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

/// One Gemma 3 slot of 2048 cells, batch 512: its sliding-window layers (window 512) get
/// a 1024-cell cache, so a history past that overwrites its own oldest window cells.
fn one_gemma_slot(prefix_cache: bool, reuse_past_window: bool) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| {
        config.models.retain(|m| m.id == FULL);
        config.router.policies = vec![common::fixture("full-only.toml")];
        let model = &mut config.models[0];
        model.slots = 1;
        model.n_ctx = 2048;
        model.batch = 512;
        model.prefix_cache = prefix_cache;
        model.fault_reuse_past_window = reuse_past_window;
    }
}

/// A system prompt of some 700 tokens: facts a reply can draw on, each line different.
fn ledger() -> String {
    let cities = [
        "Oslo", "Lima", "Pune", "Kobe", "Graz", "Cork", "Fez", "Perth",
    ];
    let goods = [
        "copper", "tea", "wool", "salt", "glass", "rice", "cork", "tin",
    ];
    let mut text = String::from("You keep the ledger of a shipping company. Facts:\n");
    for i in 0..48 {
        text.push_str(&format!(
            "Crate {i} from {} holds {} kg of {}.\n",
            cities[i % 8],
            17 * i + 5,
            goods[(i * 3) % 8]
        ));
    }
    text
}

/// A user message long enough, after the ledger, to overwrite the start of the window
/// cache (the test checks the total).
fn long_question() -> String {
    let mut text = String::from("Here is the log of last week:\n");
    for day in 0..40 {
        text.push_str(&format!(
            "Day {day}: the ship left port at {}:{:02} with {} crates.\n",
            6 + day % 12,
            (day * 7) % 60,
            3 + day % 9
        ));
    }
    text.push_str("Which crate holds the most copper?");
    text
}

fn gemma_chat(messages: Value) -> Value {
    json!({"model": "full", "messages": messages, "max_tokens": 24, "temperature": 0})
}

/// A reply's text, its prompt tokens and how many of those came from the slot's cells.
fn reply_and_usage(response: &Value) -> (String, u64, u64) {
    let text = response["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {response}"))
        .to_owned();
    let usage = &response["usage"];
    let prompt = usage["prompt_tokens"].as_u64();
    let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64();
    match (prompt, cached) {
        (Some(prompt), Some(cached)) => (text, prompt, cached),
        _ => panic!("no usage: {response}"),
    }
}

/// Prefix reuse on a sliding-window model must give the reply a cold prefill gives. The
/// history (over 1024 tokens) overflows the 1024-cell window cache, so a cut early in it
/// finds the window before the cut overwritten and must prefill cold, while the next
/// turn, cut at the history's end, still has its window and reuses it all. A wrong
/// position changes the reply after a reuse (the model copies the ledger, which takes
/// attending to the right places); a lost window changes it after the early cut, which
/// the last part shows by turning the window check off.
#[tokio::test]
async fn gemma_reuses_a_prefix_only_while_its_window_is_held_and_replies_as_cold() {
    let system = json!({"role": "system", "content": ledger()});
    let history = json!([system, {"role": "user", "content": long_question()}]);
    let short = json!([system, {"role": "user", "content": "Which crate comes from Graz?"}]);

    let warm = TestServer::start(one_gemma_slot(true, false)).await;
    let (first, history_tokens, _) =
        reply_and_usage(&warm.complete(gemma_chat(history.clone())).await);
    let mut next_turn = history.as_array().expect("array").clone();
    next_turn.push(json!({"role": "assistant", "content": first}));
    next_turn.push(json!({"role": "user", "content": "And which holds the most tea?"}));
    let next_turn = Value::Array(next_turn);
    let (follow_up, _, follow_up_cached) =
        reply_and_usage(&warm.complete(gemma_chat(next_turn.clone())).await);
    // The follow-up's slot now holds it whole; the short prompt shares the ledger only,
    // and the window before that cut was overwritten long ago.
    let (early_cut, _, early_cut_cached) =
        reply_and_usage(&warm.complete(gemma_chat(short.clone())).await);
    warm.stop().await;

    let cold = TestServer::start(one_gemma_slot(false, false)).await;
    let (follow_up_cold, _, _) = reply_and_usage(&cold.complete(gemma_chat(next_turn)).await);
    let (early_cut_cold, _, _) = reply_and_usage(&cold.complete(gemma_chat(short.clone())).await);
    cold.stop().await;

    assert!(
        history_tokens > 1024 + 256,
        "a {history_tokens}-token history does not overflow the window cache"
    );
    assert!(
        follow_up_cached >= history_tokens,
        "the follow-up reused {follow_up_cached} tokens of a {history_tokens}-token history"
    );
    assert_eq!(
        follow_up, follow_up_cold,
        "a reused history must reply as a cold one"
    );
    assert_eq!(
        early_cut_cached, 0,
        "a cut behind the lost window must not reuse"
    );
    assert_eq!(early_cut, early_cut_cold);

    // Without the window check the early cut reuses the ledger's cells (the full-attention
    // layers still hold them), and the sliding-window layers read nothing before it.
    let broken = TestServer::start(one_gemma_slot(true, true)).await;
    broken.complete(gemma_chat(history)).await;
    let (damaged, _, damaged_cached) = reply_and_usage(&broken.complete(gemma_chat(short)).await);
    broken.stop().await;
    assert!(damaged_cached > 600, "reused {damaged_cached}");
    assert_ne!(
        damaged, early_cut_cold,
        "a lost window must show in the reply, or this test cannot catch it"
    );
}
