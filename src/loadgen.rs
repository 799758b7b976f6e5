//! `tiergate bench`: a closed-loop load generator for any OpenAI-compatible
//! `/v1/chat/completions` endpoint (tiergate, llama.cpp's `llama-server`, vLLM, ...).
//!
//! Each level runs `concurrency` workers that send streaming requests back to back until
//! the level's request count is reached. Per request it measures the time to the first
//! content chunk (TTFT), the gaps between content chunks (inter-token latency) and the end
//! to end time; per level, aggregate output tokens per second over the level's wall time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

/// Prompts of roughly 32 tokens once templated, asking for long answers so that most
/// requests run to `max_tokens` (the llama.cpp batched-bench reference shape).
const PROMPTS: [&str; 8] = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious child.",
    "Describe a walk through a busy market in a coastal town on a summer morning.",
    "Write a long letter from a sailor to his family about life at sea.",
    "Tell a detailed story about a robot learning to paint landscapes in the mountains.",
    "Describe the history of bread making from ancient times to modern bakeries.",
    "Write a long diary entry of an explorer crossing a desert on a camel.",
    "Explain how rivers shape valleys over millions of years, with many examples.",
];

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub models: Vec<String>,
    pub concurrency: Vec<usize>,
    /// Requests per level; 0 means `max(16, 4 × concurrency)`.
    pub requests: usize,
    pub max_tokens: u32,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    /// Status codes of failed requests (0 for transport errors), with counts.
    pub error_statuses: Vec<(u16, usize)>,
    pub ttft_ms: Option<Percentiles>,
    pub inter_token_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
    pub completion_tokens: u64,
    pub wall_s: f64,
    pub output_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub levels: Vec<LevelReport>,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub max_tokens: u32,
    pub models: Vec<ModelReport>,
}

/// What one streamed request measured.
#[derive(Debug, Default)]
struct RequestSample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    e2e: Duration,
    completion_tokens: u64,
}

pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    let client = reqwest::Client::builder()
        .timeout(options.timeout)
        .build()
        .context("cannot build the HTTP client")?;
    let mut models = Vec::new();
    for model in &options.models {
        let mut levels = Vec::new();
        for &concurrency in &options.concurrency {
            let requests = if options.requests == 0 {
                (4 * concurrency).max(16)
            } else {
                options.requests
            };
            eprintln!("bench: {model} concurrency {concurrency}, {requests} requests");
            levels.push(run_level(&client, &options, model, concurrency, requests).await);
        }
        models.push(ModelReport {
            model: model.clone(),
            levels,
        });
    }
    Ok(BenchReport {
        url: options.url.clone(),
        max_tokens: options.max_tokens,
        models,
    })
}

async fn run_level(
    client: &reqwest::Client,
    options: &BenchOptions,
    model: &str,
    concurrency: usize,
    requests: usize,
) -> LevelReport {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let next = next.clone();
        async move {
            let mut results = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests {
                    return results;
                }
                let prompt = PROMPTS[index % PROMPTS.len()];
                results.push(one_request(client, options, model, prompt).await);
            }
        }
    });
    let results: Vec<Result<RequestSample, u16>> = futures::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let wall = started.elapsed();

    let mut error_statuses: Vec<(u16, usize)> = Vec::new();
    let mut samples = Vec::new();
    for result in results {
        match result {
            Ok(sample) => samples.push(sample),
            Err(status) => match error_statuses.iter_mut().find(|(s, _)| *s == status) {
                Some((_, count)) => *count += 1,
                None => error_statuses.push((status, 1)),
            },
        }
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let ttft: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.ttft.as_ref().map(ms))
        .collect();
    let gaps: Vec<f64> = samples.iter().flat_map(|s| s.gaps.iter().map(ms)).collect();
    let e2e: Vec<f64> = samples.iter().map(|s| ms(&s.e2e)).collect();
    let completion_tokens: u64 = samples.iter().map(|s| s.completion_tokens).sum();
    LevelReport {
        concurrency,
        requests,
        errors: requests - samples.len(),
        error_statuses,
        ttft_ms: percentiles(ttft),
        inter_token_ms: percentiles(gaps),
        e2e_ms: percentiles(e2e),
        completion_tokens,
        wall_s: wall.as_secs_f64(),
        output_tokens_per_s: completion_tokens as f64 / wall.as_secs_f64().max(1e-9),
    }
}

/// One streaming request; `Err` carries the HTTP status (0 for a transport failure).
async fn one_request(
    client: &reqwest::Client,
    options: &BenchOptions,
    model: &str,
    prompt: &str,
) -> Result<RequestSample, u16> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": options.max_tokens,
        "temperature": 0.8,
        "stream": true,
        "stream_options": {"include_usage": true},
        // Fixed-length outputs, so levels and servers are compared on equal work.
        "ignore_eos": true,
    });
    let mut request = client
        .post(format!(
            "{}/v1/chat/completions",
            options.url.trim_end_matches('/')
        ))
        .json(&body);
    if let Some(key) = &options.api_key {
        request = request.bearer_auth(key);
    }
    let sent = Instant::now();
    let response = request.send().await.map_err(|_| 0u16)?;
    let status = response.status();
    if !status.is_success() {
        return Err(status.as_u16());
    }
    let mut sample = RequestSample::default();
    let mut last_content: Option<Instant> = None;
    let mut content_chunks = 0u64;
    let mut buffer: Vec<u8> = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|_| 0u16)?;
        buffer.extend_from_slice(&piece);
        while let Some(end) = find_event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if chunk.get("error").is_some() {
                    return Err(status.as_u16());
                }
                if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                    sample.completion_tokens = tokens;
                }
                let has_content = chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty());
                if has_content {
                    let now = Instant::now();
                    content_chunks += 1;
                    match last_content {
                        None => sample.ttft = Some(now - sent),
                        Some(previous) => sample.gaps.push(now - previous),
                    }
                    last_content = Some(now);
                }
            }
        }
    }
    sample.e2e = sent.elapsed();
    // Servers that ignore include_usage: count content chunks (about one per token).
    if sample.completion_tokens == 0 {
        sample.completion_tokens = content_chunks;
    }
    Ok(sample)
}

fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n")
}

/// Nearest-rank percentiles; `None` for no data.
fn percentiles(mut values: Vec<f64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        let index = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
        (values[index] * 100.0).round() / 100.0
    };
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    Some(Percentiles {
        p50: rank(0.50),
        p90: rank(0.90),
        p95: rank(0.95),
        p99: rank(0.99),
        mean: (mean * 100.0).round() / 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=100).map(f64::from).collect()).expect("data");
        assert_eq!((p.p50, p.p90, p.p95, p.p99), (50.0, 90.0, 95.0, 99.0));
        assert_eq!(p.mean, 50.5);
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn single_value_is_every_percentile() {
        let p = percentiles(vec![7.0]).expect("data");
        assert_eq!((p.p50, p.p99), (7.0, 7.0));
    }
}
