//! The embedding model, example-based routing and the semantic reply cache, on the real
//! all-MiniLM-L6-v2 weights and (for the cache) the real fast model behind HTTP.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{fixture, header, only_fast_tier, shipped_config, TestServer};
use serde_json::{json, Value};
use tiergate::embed::{similarity, EmbedMetrics, Embedder};

fn embedder() -> Arc<Embedder> {
    let config = shipped_config();
    let embedding = config.embedding.as_ref().expect("[embedding] configured");
    Embedder::load(embedding, EmbedMetrics::default()).expect("embedding model (run `just models`)")
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_unit_vectors_for_empty_non_latin_and_overlong_text() {
    let embedder = embedder();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(200);
    for text in [
        "",
        "你好，世界",
        "Привет, как дела?",
        "مرحبا",
        long.as_str(),
    ] {
        let v = embedder.embed(text).await.expect("embeds");
        assert_eq!(v.len(), 384);
        assert!(
            (norm(&v) - 1.0).abs() < 1e-3,
            "{text:.20}: norm {}",
            norm(&v)
        );
    }
    // The window keeps the beginning: text past 256 word pieces changes nothing.
    let head = "the quick brown fox jumps over the lazy dog ".repeat(60);
    let a = embedder
        .embed(&format!("{head} and then it rained"))
        .await
        .expect("a");
    let b = embedder
        .embed(&format!("{head} but the sun came out"))
        .await
        .expect("b");
    assert!(similarity(&a, &b) > 0.9999, "{}", similarity(&a, &b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_short_text_is_not_embedded_again() {
    let embedder = embedder();
    let question = "What is the capital of France?";
    let first = embedder.embed(question).await.expect("embeds");
    let again = embedder.embed(question).await.expect("embeds");
    // The same allocation: the vector came from memory, not from another forward pass.
    assert!(Arc::ptr_eq(&first, &again));
    let long = "a long pasted document that is not worth remembering ".repeat(60);
    let first = embedder.embed(&long).await.expect("embeds");
    let again = embedder.embed(&long).await.expect("embeds");
    assert!(
        !Arc::ptr_eq(&first, &again),
        "texts over 2 KiB are embedded each time"
    );
    assert_eq!(first, again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meaning_decides_similarity_and_batching_does_not_change_vectors() {
    let embedder = embedder();
    let texts = [
        "How do I reverse a list in Python?",
        "what's the way to flip the order of a python list",
        "What is the weather like in Paris today?",
        "Tell me a joke about cats",
    ];
    let mut alone = Vec::new();
    for text in texts {
        alone.push(embedder.embed(text).await.expect("alone"));
    }
    let paraphrase = similarity(&alone[0], &alone[1]);
    let unrelated = similarity(&alone[0], &alone[2]);
    assert!(
        paraphrase > 0.7 && unrelated < 0.3,
        "{paraphrase} vs {unrelated}"
    );
    // Sent together they share padded forward passes; the mask keeps padding out. A
    // second embedder: the first remembers these texts and would not run the model.
    let fresh = self::embedder();
    let together = futures::future::join_all(texts.iter().map(|t| fresh.embed(t))).await;
    for (one, batched) in alone.iter().zip(together) {
        let batched = batched.expect("batched");
        assert!(
            similarity(one, &batched) > 0.9999,
            "{}",
            similarity(one, &batched)
        );
    }
}

/// A request that needs the full model, phrased without any keyword the rules look for,
/// goes to the full tier by its nearest examples; chit-chat stays on the fast tier. The
/// explanation names the neighbours.
#[test]
fn route_explain_shows_the_nearest_examples_and_similar_to_routes_by_meaning() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let options = |prompt: &str| tiergate::check::RouteOptions {
        config: root.join("config/tiergate.toml"),
        policies: Vec::new(),
        prompt: Some(prompt.to_owned()),
        request: None,
        caller: Default::default(),
    };
    let needs_full = "my nightly job dies with a KeyError when the settings file lacks a section, how do I make it tolerate that";
    let explained = tiergate::check::explain(&options(needs_full)).expect("explains");
    let e = &explained.explanation;
    assert_eq!(
        e.route.tier,
        "full",
        "{}",
        tiergate::check::render(&explained)
    );
    assert_eq!(e.route.rule, "similar-to-complex");
    let similar = e.features.similar.as_ref().expect("the vote is explained");
    let class = similar.class.as_deref().unwrap_or("none");
    assert!(
        ["code", "maths", "reasoning", "writing"].contains(&class),
        "{class}"
    );
    assert!(similar.nearest.len() == 7 && similar.nearest[0].similarity > 0.2);
    assert!(similar.nearest.iter().any(|n| n.class == "code"));
    let rendered = tiergate::check::render(&explained);
    assert!(
        rendered.contains(&format!("nearest examples vote {class}")),
        "{rendered}"
    );

    let chat = tiergate::check::explain(&options("hey, how was your weekend?")).expect("explains");
    assert_eq!(chat.explanation.route.tier, "fast");
    assert_eq!(
        chat.explanation
            .features
            .similar
            .as_ref()
            .and_then(|s| s.class.as_deref()),
        Some("chitchat")
    );
}

fn ask(text: &str) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": text}],
           "max_tokens": 8, "temperature": 0})
}

/// Through HTTP on the real fast model: a paraphrase is served the cached reply with its
/// similarity; the opposite question and a changed number are not, and the guards count
/// the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_cache_serves_paraphrases_and_refuses_look_alikes() {
    let server = TestServer::start(|config| {
        only_fast_tier(config);
        config.router.policies = vec![fixture("semantic-fast.toml")];
    })
    .await;
    let first = server
        .post_chat(&ask("How do I turn on dark mode in Firefox?"))
        .await;
    assert_eq!(header(&first, "x-tiergate-cache"), Some("miss"));
    let original: Value = first.json().await.expect("json");
    // The reply is stored when its generation ends, just after the client has it.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let paraphrase = server
        .post_chat(&ask(
            "hey, how can I turn on the dark mode in firefox please",
        ))
        .await;
    assert_eq!(header(&paraphrase, "x-tiergate-cache"), Some("semantic"));
    let score: f32 = header(&paraphrase, "x-tiergate-cache-similarity")
        .expect("similarity header")
        .parse()
        .expect("a number");
    assert!((0.8..=1.0).contains(&score), "{score}");
    let replayed: Value = paraphrase.json().await.expect("json");
    assert_eq!(
        replayed["choices"][0]["message"]["content"],
        original["choices"][0]["message"]["content"]
    );
    // Usage counts this request's own prompt: the same question generated afresh (other
    // sampling parameters, so another cache scope) reports the same prompt tokens.
    let mut fresh = ask("hey, how can I turn on the dark mode in firefox please");
    fresh["temperature"] = json!(0.3);
    let fresh: Value = server.complete(fresh).await;
    assert_eq!(
        replayed["usage"]["prompt_tokens"], fresh["usage"]["prompt_tokens"],
        "{replayed} / {fresh}"
    );
    assert_ne!(
        replayed["usage"]["prompt_tokens"],
        original["usage"]["prompt_tokens"]
    );

    for look_alike in [
        "How do I turn off dark mode in Firefox?",
        "How do I turn on dark mode in Firefox 2?",
    ] {
        let response = server.post_chat(&ask(look_alike)).await;
        assert_eq!(
            header(&response, "x-tiergate-cache"),
            Some("miss"),
            "{look_alike}"
        );
        assert_eq!(response.status(), 200);
    }
    let metric = |sample: &'static str| {
        let server = &server;
        async move { server.metric(sample).await.unwrap_or(0.0) }
    };
    assert_eq!(
        metric(r#"tiergate_semantic_cache_lookups_total{tier="fast",outcome="hit"}"#).await,
        1.0
    );
    assert_eq!(
        metric(r#"tiergate_semantic_cache_guard_refusals_total{guard="opposites"}"#).await,
        1.0
    );
    assert_eq!(
        metric(r#"tiergate_semantic_cache_guard_refusals_total{guard="numbers"}"#).await,
        1.0
    );
    server.stop().await;
}
