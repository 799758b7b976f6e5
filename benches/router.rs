//! Routing cost per request: feature extraction plus policy evaluation on the default
//! policy, with exact prompt token counts from the real vocabularies, for prompts of about
//! 20, 500 and 4,000 tokens.
//!
//! Criterion reports means; the target is a p99, so after criterion each size is
//! also timed one call at a time and p50/p99 are printed.
//!
//! `cargo bench --bench router` (needs `just models`).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, Criterion};
use tiergate::chat::{ChatMessage, Role};
use tiergate::check::{vocab_models, vocab_tiers, VocabOnly};
use tiergate::config::Config;
use tiergate::engine::prompt::Prompter;
use tiergate::engine::Engine;
use tiergate::router::{Caller, Features, Policy, TokenCounter};
use tiergate::tiers::Tiers;

/// Chit-chat that matches no text rule, so the 20- and 500-token prompts try every rule
/// (the slowest path: prompt-token threshold and complexity score included); the
/// 4,000-token one stops at `long-context`.
const FILLER: &str = "I spent the weekend walking by the river with my sister, and we talked \
about the garden, the neighbours' new dog and where to go on holiday this summer. ";

struct Setup {
    policy: Policy,
    models: Vec<Arc<VocabOnly>>,
    tiers: Tiers,
    prompts: Vec<(u32, Vec<ChatMessage>)>,
}

fn setup() -> Setup {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::load(&root.join("config/tiergate.toml")).unwrap_or_else(|e| panic!("{e}"));
    let policy =
        Policy::load(&config.router.policies, &config.tiers()).unwrap_or_else(|e| panic!("{e:?}"));
    let models = vocab_models(&config).unwrap_or_else(|e| panic!("{e:#}"));
    let tiers = vocab_tiers(&models);
    let fast = prompter(&models, "fast");
    let prompts = [20u32, 500, 4000]
        .iter()
        .map(|&target| {
            let mut text = String::from("Hi! ");
            let messages = loop {
                let messages = vec![ChatMessage {
                    role: Role::User,
                    content: text.clone(),
                }];
                let tokens = fast.count(&messages).expect("count");
                if tokens >= target {
                    break messages;
                }
                // Grow by words so the small prompt lands near its target.
                let missing = (target - tokens) as usize;
                let words: Vec<&str> = FILLER.split(' ').take(missing.max(1)).collect();
                text.push_str(&words.join(" "));
                text.push(' ');
            };
            let tokens = fast.count(&messages).expect("count");
            (tokens, messages)
        })
        .collect();
    Setup {
        policy,
        models,
        tiers,
        prompts,
    }
}

/// The template and tokenizers of `tier`'s first model.
fn prompter<'a>(models: &'a [Arc<VocabOnly>], tier: &str) -> &'a Prompter {
    models
        .iter()
        .find(|m| m.info().tier == tier)
        .and_then(|m| m.prompter())
        .unwrap_or_else(|| panic!("no model in tier {tier}"))
}

fn route_once(setup: &Setup, messages: &[ChatMessage]) -> String {
    let features = Features::extract(messages, None, Caller::default());
    let tokens = setup.tiers.counter(messages, None);
    setup.policy.route(&features, &tokens, None).rule
}

fn bench_routing(c: &mut Criterion) {
    let setup = setup();
    let mut group = c.benchmark_group("route");
    for (tokens, messages) in &setup.prompts {
        group.bench_function(format!("{tokens}_tokens"), |b| {
            b.iter(|| route_once(&setup, black_box(messages)))
        });
    }
    group.finish();
}

/// A known count: the policy's cost without the tokenizer's.
struct KnownCount(u32);

impl TokenCounter for KnownCount {
    fn prompt_tokens(&self, _tier: &str) -> Result<u32, String> {
        Ok(self.0)
    }
}

/// p50, p99 and max of `calls` timed calls, in microseconds.
fn percentiles(calls: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    let mut micros: Vec<f64> = (0..calls)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), at(1.0))
}

/// One call at a time, for percentiles, split into the router's own work and the tokenizer's.
fn print_percentiles() {
    let setup = setup();
    println!("\nper-call latency in us, default policy (p50 / p99 / max):");
    for (tokens, messages) in &setup.prompts {
        let calls = if *tokens > 1000 { 300 } else { 2_000 };
        let rule = route_once(&setup, messages);
        let whole = percentiles(calls, || {
            black_box(route_once(&setup, black_box(messages)));
        });
        let counters: Vec<_> = ["fast", "full"]
            .iter()
            .filter_map(|tier| prompter(&setup.models, tier).counter().ok())
            .collect();
        let whole_cold = percentiles(calls, || {
            counters.iter().for_each(|c| c.clear_word_cache());
            black_box(route_once(&setup, black_box(messages)));
        });
        let without_tokenizer = percentiles(calls, || {
            let features = Features::extract(black_box(messages), None, Caller::default());
            black_box(setup.policy.route(&features, &KnownCount(*tokens), None));
        });
        let tier_cost = |tier: &str| {
            let prompter = prompter(&setup.models, tier);
            let counter = prompter.counter().unwrap_or_else(|why| panic!("{why}"));
            let warm = percentiles(calls, || {
                black_box(prompter.count(black_box(messages)).ok());
            });
            // Every word new to the cache: the first time a text is seen.
            let cold = percentiles(calls, || {
                counter.clear_word_cache();
                black_box(prompter.count(black_box(messages)).ok());
            });
            let llama = percentiles(calls.min(500), || {
                black_box(prompter.tokenize(black_box(messages)).ok());
            });
            (warm, cold, llama)
        };
        let show =
            |(p50, p99, max): (f64, f64, f64)| format!("{p50:>7.1} / {p99:>7.1} / {max:>7.1}");
        println!("  {tokens:>5} prompt tokens (rule `{rule}`, {calls} calls)");
        println!(
            "      features + policy + exact token count : {}",
            show(whole)
        );
        println!(
            "      same, word cache empty (text unseen)  : {}",
            show(whole_cold)
        );
        println!(
            "      features + policy, count known        : {}",
            show(without_tokenizer)
        );
        for tier in ["fast", "full"] {
            let (warm, cold, llama) = tier_cost(tier);
            println!(
                "      {tier} tier, template + count (Rust)    : {}",
                show(warm)
            );
            println!(
                "      {tier} tier, same, word cache empty     : {}",
                show(cold)
            );
            println!(
                "      {tier} tier, template + llama.cpp tokens: {}",
                show(llama)
            );
        }
    }
}

criterion_group!(benches, bench_routing);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_percentiles();
}
