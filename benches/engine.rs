//! Decode throughput of the engine's step loop alone, without HTTP: the figure to compare
//! with llama.cpp's `llama-batched-bench` (32-token prompts, 64 generated tokens per
//! sequence, every sequence started together).
//!
//!   cargo bench --bench engine            # every model in config/tiergate.toml
//!   TIERGATE_BENCH_MODELS=gemma-3-270m TIERGATE_BENCH_KV_UNIFIED=1 cargo bench --bench engine
//!
//! Prints one JSON object per (model, sampling, sequences). `decode_tok_s` counts tokens
//! after every sequence has its first token (batched-bench's S_TG); `total_tok_s` counts
//! all generated tokens over the whole run, prefill included.
//!
//!   TIERGATE_BENCH_CONSTRAINED=1 cargo bench --bench engine
//!   TIERGATE_BENCH_CONSTRAINED=1 TIERGATE_BENCH_BIASES=300 cargo bench --bench engine
//!
//! instead measures what one JSON-schema-constrained sequence costs the others in its
//! batch: 8 sequences at temperature 1 (top-k 40, the API's default, then the whole
//! vocabulary), all plain, then 7 plain and 1 constrained, in interleaved rounds; it
//! prints the plain sequences' mean ms per token in each.

use std::path::Path;
use std::time::Instant;

use futures::future::join_all;
use serde_json::json;
use tiergate::chat::{ChatMessage, ReplyFormat, Role, SamplingParams};
use tiergate::config::Config;
use tiergate::engine::llama::LlamaEngine;
use tiergate::engine::{Engine, GenerationRequest, TokenEvent};
use tiergate::metrics::{Metrics, ModelLabels};

const GENERATED: u32 = 64;
const SEQUENCES: [usize; 3] = [1, 4, 16];
/// About 32 tokens once templated.
const PROMPT: &str = "Write a long story about a lighthouse keeper who finds a message in a bottle on a stormy night.";

fn main() {
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiergate.toml");
    let mut config = Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    if let Ok(only) = std::env::var("TIERGATE_BENCH_MODELS") {
        config
            .models
            .retain(|m| only.split(',').any(|id| id == m.id));
    }
    let kv_unified = std::env::var("TIERGATE_BENCH_KV_UNIFIED").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let metrics = Metrics::new();
    for mut model in config.models {
        model.kv_unified = kv_unified;
        if let Some(n_ctx) = std::env::var("TIERGATE_BENCH_N_CTX")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            model.n_ctx = n_ctx;
        }
        let labels = ModelLabels {
            model: model.id.clone(),
            tier: model.tier.clone(),
        };
        let (engine, ready, thread) =
            LlamaEngine::start(model.clone(), metrics.engine_metrics(&labels)).expect("thread");
        runtime
            .block_on(ready)
            .expect("ready signal")
            .unwrap_or_else(|e| panic!("{e}"));
        // One warm-up so first-touch page faults of the weights are not measured.
        runtime.block_on(run_batch(engine.as_ref(), 1, greedy()));
        if std::env::var("TIERGATE_BENCH_CONSTRAINED").is_ok_and(|v| v == "1") {
            constrained_cost(&runtime, engine.as_ref(), &model.id);
            drop(engine);
            runtime.block_on(thread.stop(std::time::Duration::from_secs(10)));
            continue;
        }
        for (sampling_name, sampling) in [("greedy", greedy()), ("top_k40_t0.8", top_k())] {
            for sequences in SEQUENCES {
                let (total_s, decode_s) =
                    runtime.block_on(run_batch(engine.as_ref(), sequences, sampling.clone()));
                let generated = sequences as f64 * f64::from(GENERATED);
                let after_first = sequences as f64 * f64::from(GENERATED - 1);
                println!(
                    "{}",
                    json!({
                        "model": model.id,
                        "threads": model.threads,
                        "kv_unified": kv_unified,
                        "n_ctx": model.n_ctx,
                        "sampling": sampling_name,
                        "sequences": sequences,
                        "decode_tok_s": (after_first / decode_s).round(),
                        "total_tok_s": (generated / total_s).round(),
                        "wall_s": (total_s * 1000.0).round() / 1000.0,
                    })
                );
            }
        }
        drop(engine);
        runtime.block_on(thread.stop(std::time::Duration::from_secs(10)));
    }
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn top_k() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 40,
        seed: Some(1),
        ..SamplingParams::default()
    }
}

/// Starts `sequences` generations together; returns (total seconds, seconds from the last
/// first token to the end).
async fn run_batch(engine: &dyn Engine, sequences: usize, sampling: SamplingParams) -> (f64, f64) {
    let started = Instant::now();
    let streams: Vec<_> = (0..sequences)
        .map(|_| {
            engine
                .submit(GenerationRequest {
                    messages: vec![ChatMessage {
                        role: Role::User,
                        content: PROMPT.into(),
                    }],
                    sampling: sampling.clone(),
                    max_tokens: Some(GENERATED),
                    max_tokens_cap: None,
                    stop: Vec::new(),
                    ignore_eos: true,
                    span: tracing::Span::none(),
                    first_token_by: None,
                    ..GenerationRequest::default()
                })
                .expect("submit")
        })
        .collect();
    let firsts_and_ends = join_all(streams.into_iter().map(|mut stream| async move {
        let mut first = None;
        while let Some(event) = stream.next_event().await {
            match event {
                TokenEvent::Text(_) | TokenEvent::Scored { .. } | TokenEvent::ToolCalls(_) => {
                    first.get_or_insert_with(Instant::now);
                }
                TokenEvent::Finished { usage, .. } => {
                    assert_eq!(
                        usage.completion_tokens, GENERATED,
                        "ignore_eos must run to max_tokens"
                    );
                    break;
                }
                TokenEvent::Failed(err) => panic!("{err}"),
            }
        }
        (first.unwrap_or_else(Instant::now), Instant::now())
    }))
    .await;
    let last_first = firsts_and_ends
        .iter()
        .map(|(first, _)| *first)
        .max()
        .unwrap_or(started);
    let end = firsts_and_ends
        .iter()
        .map(|(_, end)| *end)
        .max()
        .unwrap_or(started);
    (
        end.duration_since(started).as_secs_f64(),
        end.duration_since(last_first).as_secs_f64(),
    )
}

/// A list of records, long enough that a constrained sequence outlives the plain ones.
const SCHEMA: &str = r#"{"type":"object","properties":{"people":{"type":"array","minItems":20,"items":{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"city":{"type":"string"}},"required":["name","age","city"]}}},"required":["people"]}"#;
const CONSTRAINED_ROUNDS: usize = 5;
const BATCH: usize = 8;

/// Per round: 8 plain sequences, then 7 plain with 1 constrained; prints the plain
/// sequences' ms per token after their first token, each round and the medians.
fn constrained_cost(runtime: &tokio::runtime::Runtime, engine: &dyn Engine, model: &str) {
    for top_k in [40, 0] {
        constrained_cost_at(runtime, engine, model, top_k);
    }
}

fn constrained_cost_at(
    runtime: &tokio::runtime::Runtime,
    engine: &dyn Engine,
    model: &str,
    top_k: u32,
) {
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for _ in 0..CONSTRAINED_ROUNDS {
        alone.push(runtime.block_on(plain_ms_per_token(engine, 0, top_k)));
        beside.push(runtime.block_on(plain_ms_per_token(engine, 1, top_k)));
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let rounded = |values: &[f64]| {
        values
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    };
    println!(
        "{}",
        json!({
            "model": model,
            "top_k": top_k,
            "sequences": BATCH,
            "plain_ms_per_token_all_plain": rounded(&alone),
            "plain_ms_per_token_one_constrained": rounded(&beside),
            "median_all_plain": (median(&mut alone) * 100.0).round() / 100.0,
            "median_one_constrained": (median(&mut beside) * 100.0).round() / 100.0,
        })
    );
}

/// `TIERGATE_BENCH_BIASES=N`: the constrained sequence also carries N small logit biases
/// (on ids spread over the first 40k, which both default vocabularies hold), to measure
/// the refusal path with llama.cpp's bias search.
fn constrained_biases() -> Vec<(i32, f32)> {
    let count: i32 = std::env::var("TIERGATE_BENCH_BIASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (0..count).map(|k| (1000 + k * 97 % 39_000, -0.5)).collect()
}

/// Runs `BATCH` sequences at temperature 1 and `top_k`, the first `constrained` of them under
/// `SCHEMA`; the plain ones' mean ms per token after their first token.
async fn plain_ms_per_token(engine: &dyn Engine, constrained: usize, top_k: u32) -> f64 {
    let streams: Vec<_> = (0..BATCH)
        .map(|i| {
            let format = if i < constrained {
                ReplyFormat::JsonSchema {
                    name: "people".into(),
                    schema: SCHEMA.into(),
                    strict: Some(true),
                }
            } else {
                ReplyFormat::Text
            };
            let stream = engine
                .submit(GenerationRequest {
                    messages: vec![ChatMessage {
                        role: Role::User,
                        content: "List twenty people with their name, age and city.".into(),
                    }],
                    sampling: SamplingParams {
                        temperature: 1.0,
                        top_k,
                        seed: Some(i as u32 + 1),
                        logit_bias: if i < constrained {
                            constrained_biases()
                        } else {
                            Vec::new()
                        },
                        ..SamplingParams::default()
                    },
                    max_tokens: Some(GENERATED),
                    // A constrained reply ends where its JSON does.
                    ignore_eos: i >= constrained,
                    format,
                    ..GenerationRequest::default()
                })
                .expect("submit");
            (i >= constrained, stream)
        })
        .collect();
    let per_token = join_all(streams.into_iter().map(|(plain, mut stream)| async move {
        let (mut first, mut tokens) = (None, 0u32);
        while let Some(event) = stream.next_event().await {
            match event {
                TokenEvent::Text(_) | TokenEvent::Scored { .. } | TokenEvent::ToolCalls(_) => {
                    first.get_or_insert_with(Instant::now);
                    tokens += 1;
                }
                TokenEvent::Finished { .. } => break,
                TokenEvent::Failed(err) => panic!("{err}"),
            }
        }
        let first = first.unwrap_or_else(Instant::now);
        plain.then(|| {
            first.elapsed().as_secs_f64() * 1000.0 / f64::from(tokens.saturating_sub(1).max(1))
        })
    }))
    .await;
    let plain: Vec<f64> = per_token.into_iter().flatten().collect();
    plain.iter().sum::<f64>() / plain.len() as f64
}
