//! Routing on the real tokenizers and a real server: the default policy's choices, the
//! headers and explanations clients and operators see, hot reload, and the CLI tools.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{shipped_config, user, wait_until, TestServer, FAST, FULL};
use serde_json::{json, Value};
use tiergate::chat::{ChatMessage, Role};
use tiergate::check::{vocab_models, vocab_tiers};
use tiergate::router::{Caller, Features, Policy};

fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role,
        content: content.to_owned(),
    }
}

#[test]
fn default_policy_sends_each_kind_of_prompt_to_its_tier() {
    let config = shipped_config();
    let policy = Policy::load(&config.router.policies, &config.tiers()).expect("default policy");
    let tiers = vocab_tiers(&vocab_models(&config).expect("vocabularies"));
    let long_document = "The committee met on Tuesday and discussed the budget. ".repeat(120);
    let hint = |h: &str| Caller {
        hint: Some(h.to_owned()),
        ..Caller::default()
    };
    let many_turns_with_system = vec![
        message(Role::System, "You are a helpful travel agent."),
        message(Role::User, "I want to visit Lisbon."),
        message(Role::Assistant, "Lovely city. When?"),
        message(Role::User, "In May."),
        message(Role::Assistant, "Great. For how long?"),
        message(Role::User, "A week."),
        message(Role::Assistant, "Any budget?"),
        message(Role::User, "Moderate. Suggest hotels."),
    ];

    // (what the case covers, messages, max_tokens, caller, tier, rule)
    type Case<'a> = (
        &'a str,
        Vec<ChatMessage>,
        Option<u32>,
        Caller,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "greeting",
            vec![message(Role::User, "Hi! How are you today?")],
            None,
            Caller::default(),
            "fast",
            "default",
        ),
        (
            "simple fact",
            vec![message(Role::User, "What is the capital of France?")],
            None,
            Caller::default(),
            "fast",
            "default",
        ),
        (
            "small talk with a number",
            vec![message(Role::User, "I have 3 cats, any name ideas?")],
            None,
            Caller::default(),
            "fast",
            "default",
        ),
        (
            "hint asks for fast",
            vec![message(Role::User, "Prove Fermat's last theorem")],
            None,
            hint("fast"),
            "fast",
            "hint-fast",
        ),
        (
            "hint asks for full",
            vec![message(Role::User, "hello")],
            None,
            hint("quality"),
            "full",
            "hint-full",
        ),
        (
            "long context",
            vec![message(Role::User, &long_document)],
            None,
            Caller::default(),
            "full",
            "long-context",
        ),
        (
            "fenced code",
            vec![message(
                Role::User,
                "Why does this fail?\n```\nlet x: u32 = -1;\n```",
            )],
            None,
            Caller::default(),
            "full",
            "code",
        ),
        (
            "code request",
            vec![message(
                Role::User,
                "Write a Python function that parses JSON",
            )],
            None,
            Caller::default(),
            "full",
            "code",
        ),
        (
            "proof",
            vec![message(
                Role::User,
                "Prove that the square root of 2 is irrational",
            )],
            None,
            Caller::default(),
            "full",
            "math",
        ),
        (
            "equation",
            vec![message(Role::User, "Solve for x: 3x + 5 = 20")],
            None,
            Caller::default(),
            "full",
            "math",
        ),
        (
            "step by step",
            vec![message(
                Role::User,
                "Explain why the sky is blue, step by step",
            )],
            None,
            Caller::default(),
            "full",
            "multi-step-reasoning",
        ),
        (
            "comparison",
            vec![message(
                Role::User,
                "Compare the French and American revolutions",
            )],
            None,
            Caller::default(),
            "full",
            "multi-step-reasoning",
        ),
        (
            "long answer",
            vec![message(Role::User, "Tell me a story about a dragon")],
            Some(2000),
            Caller::default(),
            "full",
            "long-answer",
        ),
        (
            "many turns, system prompt, longish answer",
            many_turns_with_system,
            Some(900),
            Caller::default(),
            "full",
            "complex",
        ),
    ];
    let mut wrong = Vec::new();
    for (case, messages, max_tokens, caller, tier, rule) in cases {
        let features = Features::extract(&messages, max_tokens, caller);
        let tokens = tiers.counter(&messages, None);
        let route = policy.route(&features, &tokens, None);
        if (route.tier.as_str(), route.rule.as_str()) != (tier, rule) {
            wrong.push(format!(
                "{case}: got {}/{}, want {tier}/{rule}",
                route.tier, route.rule
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_say_which_tier_rule_and_model_served_them() {
    let server = TestServer::both().await;
    let ask = |content: &str, model: &str| json!({"model": model, "messages": user(content), "max_tokens": 4, "temperature": 0});

    let resp = server
        .post_chat(&ask("Write a Rust function that adds two numbers", "auto"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tiergate-tier"], "full");
    assert_eq!(resp.headers()["x-tiergate-rule"], "code");
    assert_eq!(resp.headers()["x-tiergate-model"], FULL);
    assert!(resp.headers().get("x-tiergate-pinned").is_none());
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["model"], FULL);

    // Streaming: every chunk names the model that served.
    let mut streamed = ask("Hi there!", "auto");
    streamed["stream"] = json!(true);
    let resp = server.post_chat(&streamed).await;
    assert_eq!(resp.headers()["x-tiergate-tier"], "fast");
    assert_eq!(resp.headers()["x-tiergate-rule"], "default");
    let payloads = common::parse_sse(&resp.text().await.expect("body"));
    for payload in payloads.iter().filter(|p| p.as_str() != "[DONE]") {
        let chunk: Value = serde_json::from_str(payload).expect("chunk");
        assert_eq!(chunk["model"], FAST, "{payload}");
    }

    // Pinning a tier by name skips the rules' tier choice.
    let resp = server.post_chat(&ask("Hi there!", "full")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tiergate-tier"], "full");
    assert_eq!(resp.headers()["x-tiergate-pinned"], "true");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["model"], FULL);

    let routed = server
        .metric(r#"tiergate_route_decisions_total{tier="full",rule="code"}"#)
        .await;
    assert_eq!(routed, Some(1.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_route_explains_a_request_without_generating() {
    let server = TestServer::both().await;
    let resp = server
        .client
        .post(server.url("/v1/route"))
        .json(&json!({"model": "auto", "messages": user("Prove that 17 is prime")}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let explanation: Value = resp.json().await.expect("json");
    assert_eq!(explanation["route"]["tier"], "full", "{explanation}");
    assert_eq!(explanation["route"]["rule"], "math");
    assert_eq!(explanation["model"], FULL);
    assert_eq!(explanation["features"]["math"], true);
    let rules = explanation["rules"].as_array().expect("rules");
    let last = rules.last().expect("a rule");
    assert_eq!(
        (last["rule"].as_str(), last["matched"].as_bool()),
        (Some("math"), Some(true))
    );
    for earlier in &rules[..rules.len() - 1] {
        assert_eq!(earlier["matched"], false, "{earlier}");
        assert!(
            earlier["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{earlier}"
        );
    }
    assert!(
        explanation["prompt_tokens"]["full"]
            .as_u64()
            .is_some_and(|n| n > 5),
        "{explanation}"
    );
    let generated = server.metrics().await;
    assert!(
        !generated.contains("tiergate_generation_tokens_total{"),
        "{generated}"
    );

    // A request that needs the full model without the rules' keywords: the nearest
    // labelled examples decide, and the explanation lists them with their similarities.
    let resp = server
        .client
        .post(server.url("/v1/route"))
        .json(&json!({"messages": user("my nightly job dies with a KeyError when the settings file lacks a section, how do I make it tolerate that")}))
        .send()
        .await
        .expect("sent");
    let explanation: Value = resp.json().await.expect("json");
    assert_eq!(
        explanation["route"]["rule"], "similar-to-complex",
        "{explanation}"
    );
    let similar = &explanation["features"]["similar"];
    let full_classes = ["code", "maths", "reasoning", "writing"];
    assert!(
        full_classes.contains(&similar["class"].as_str().unwrap_or("")),
        "{explanation}"
    );
    let nearest = similar["nearest"].as_array().expect("nearest examples");
    assert_eq!(nearest.len(), 7);
    assert!(nearest[0]["similarity"].as_f64().is_some_and(|s| s > 0.2));
    assert!(nearest[0]["example"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));

    // Bad input is an OpenAI error, as on the chat endpoint.
    let resp = server
        .client
        .post(server.url("/v1/route"))
        .json(&json!({"model": "nope", "messages": user("hi")}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 404);
    server.stop().await;
}

async fn route_rule(server: &TestServer, content: &str) -> String {
    let resp = server
        .client
        .post(server.url("/v1/route"))
        .json(&json!({"messages": user(content)}))
        .send()
        .await
        .expect("sent");
    let body: Value = resp.json().await.expect("json");
    body["route"]["rule"].as_str().expect("rule").to_owned()
}

const BASE_POLICY: &str = "[defaults]\ntier = \"fast\"\nttft_ms = 30000\ntotal_ms = 120000\n";

#[tokio::test(flavor = "multi_thread")]
async fn editing_a_policy_reloads_it_and_an_invalid_edit_keeps_the_old_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, BASE_POLICY).expect("write");
    let path = policy_path.clone();
    let server = TestServer::start(move |config| {
        config.models.retain(|m| m.id == FAST);
        config.router.policies = vec![path];
    })
    .await;
    assert_eq!(route_rule(&server, "hello there").await, "default");

    let with_rule = format!(
        "{BASE_POLICY}\n[[rule]]\nname = \"greeting\"\nwhen = {{ keywords = [\"hello\"] }}\n"
    );
    std::fs::write(&policy_path, with_rule).expect("write");
    wait_until(Duration::from_secs(10), || async {
        route_rule(&server, "hello there").await == "greeting"
    })
    .await;
    let applied = r#"tiergate_policy_reloads_total{outcome="applied"}"#;
    assert!(server.metric(applied).await.is_some_and(|n| n >= 1.0));

    // A bad regex: rejected, counted, and the previous policy still routes.
    let broken =
        format!("{BASE_POLICY}\n[[rule]]\nname = \"broken\"\nwhen = {{ regex = \"(\" }}\n");
    std::fs::write(&policy_path, broken).expect("write");
    let rejected = r#"tiergate_policy_reloads_total{outcome="rejected"}"#;
    wait_until(Duration::from_secs(10), || async {
        server.metric(rejected).await.is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(route_rule(&server, "hello there").await, "greeting");
    server.stop().await;
}

/// An edit to a policy's example file (not the policy itself) reloads the policy, and the
/// real embedding model re-embeds the changed examples.
#[tokio::test(flavor = "multi_thread")]
async fn editing_an_example_file_reloads_the_examples() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    let examples_path = dir.path().join("examples.toml");
    let examples = |greet: &str, other: &str| {
        format!("[greet]\nexamples = [\"{greet}\"]\n[other]\nexamples = [\"{other}\"]\n")
    };
    let greeting = "hello there, my friend";
    let integral = "compute the integral of x squared";
    std::fs::write(&examples_path, examples(greeting, integral)).expect("write");
    std::fs::write(
        &policy_path,
        format!("{BASE_POLICY}\n[[rule]]\nname = \"greeting\"\nwhen = {{ similar_to = \"greet\" }}\n\n[similarity]\nexamples = [\"examples.toml\"]\nmin_similarity = 0.3\n"),
    )
    .expect("write");
    let path = policy_path.clone();
    let server = TestServer::start(move |config| {
        config.models.retain(|m| m.id == FAST);
        config.router.policies = vec![path];
    })
    .await;
    assert_eq!(route_rule(&server, "hello there").await, "greeting");

    std::fs::write(&examples_path, examples(integral, greeting)).expect("write");
    wait_until(Duration::from_secs(10), || async {
        route_rule(&server, "hello there").await == "default"
    })
    .await;
    server.stop().await;
}

fn tiergate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
}

#[test]
fn check_lists_every_problem_with_file_and_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let policy = dir.path().join("bad.toml");
    std::fs::write(
        &policy,
        format!("{BASE_POLICY}colour = 1\n\n[[rule]]\nname = \"x\"\nwhen = {{ regex = \"[\" }}\ntier = \"huge\"\n"),
    )
    .expect("write policy");
    let config = dir.path().join("tiergate.toml");
    let shipped = std::fs::read_to_string(root.join("config/tiergate.toml")).expect("config");
    let models = root.join("models").display().to_string();
    let text = shipped.replace("../models", &models).replace(
        "../router-policies/default.toml",
        &policy.display().to_string(),
    );
    std::fs::write(&config, text).expect("write config");

    let out = tiergate()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = policy.display().to_string();
    let expected = format!("{file}:5: defaults.colour: unknown key");
    assert!(
        stderr.contains(&expected),
        "missing `{expected}` in:\n{stderr}"
    );

    // Fix the unknown key: the two semantic errors are then reported together.
    std::fs::write(
        &policy,
        format!(
            "{BASE_POLICY}\n[[rule]]\nname = \"x\"\nwhen = {{ regex = \"[\" }}\ntier = \"huge\"\n"
        ),
    )
    .expect("write policy");
    let out = tiergate()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{file}:8: rule[0].when.regex: invalid regex")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}:9: rule[0].tier: unknown tier `huge`")),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s)"), "{stderr}");

    let ok = tiergate()
        .arg("check")
        .arg("--config")
        .arg(root.join("config/tiergate.toml"))
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Operators see which tokenizer counts each model's prompts.
    let stdout = String::from_utf8_lossy(&ok.stdout);
    for model in [FAST, FULL] {
        assert!(
            stdout.contains(&format!(
                "{model}: prompt tokens counted by the Rust tokenizer"
            )),
            "{stdout}"
        );
    }
}

#[test]
fn route_explain_prints_features_rules_and_the_route() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("config/tiergate.toml");
    let out = tiergate()
        .args(["route", "--explain", "--config"])
        .arg(&config)
        .arg("Explain why the sky is blue, step by step")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("reasoning yes (cues 2)"), "{text}");
    assert!(text.contains("no match code"), "{text}");
    assert!(text.contains("match    multi-step-reasoning"), "{text}");
    assert!(
        text.contains("route: tier full (model gemma-3-270m) by rule `multi-step-reasoning`"),
        "{text}"
    );

    // The same from a JSON request file, as JSON.
    let dir = tempfile::tempdir().expect("temp dir");
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        json!({"model": "auto", "messages": user("hello"), "max_tokens": 5}).to_string(),
    )
    .expect("write");
    let out = tiergate()
        .args(["route", "--json", "--config"])
        .arg(&config)
        .arg("--request")
        .arg(&request)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let explanation: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(explanation["route"]["tier"], "fast");
    assert_eq!(explanation["features"]["requested_max_tokens"], 5);
}

/// A policy replaced without being written to: an editor's rename over the file, and a
/// Kubernetes ConfigMap update (a new directory, then the `..data` symlink swapped to it).
#[cfg(unix)]
#[tokio::test]
async fn policy_reload_sees_a_rename_and_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    use std::sync::Arc;
    use tiergate::router::{reload, PolicyStore};

    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let rule = |name: &str| {
        format!(
            "{BASE_POLICY}\n[[rule]]\nname = \"{name}\"\nwhen = {{ keywords = [\"{name}\"] }}\n"
        )
    };
    // The ConfigMap layout: policy.toml -> ..data/policy.toml, ..data -> v1.
    std::fs::create_dir(root.join("v1")).expect("v1");
    std::fs::write(root.join("v1/policy.toml"), rule("first")).expect("write");
    symlink("v1", root.join("..data")).expect("..data");
    symlink("..data/policy.toml", root.join("policy.toml")).expect("policy.toml");
    let store = Arc::new(
        PolicyStore::load(vec![root.join("policy.toml")], vec!["fast".into()]).expect("policy"),
    );
    let _watching = reload::spawn(store.clone(), true, |_| {}).expect("watch");
    let rule_names = |store: &PolicyStore| -> Vec<String> {
        store
            .current()
            .rules
            .iter()
            .map(|r| r.name.clone())
            .collect()
    };
    assert_eq!(rule_names(&store), ["first"]);

    std::fs::create_dir(root.join("v2")).expect("v2");
    std::fs::write(root.join("v2/policy.toml"), rule("second")).expect("write");
    symlink("v2", root.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    wait_until(Duration::from_secs(10), || async {
        rule_names(&store) == ["second"]
    })
    .await;

    // An editor's save: a new file renamed over the link.
    std::fs::write(root.join("policy.toml.tmp"), rule("third")).expect("write");
    std::fs::rename(root.join("policy.toml.tmp"), root.join("policy.toml")).expect("rename");
    wait_until(Duration::from_secs(10), || async {
        rule_names(&store) == ["third"]
    })
    .await;
}
