//! `tiergate bench`: a load generator for any OpenAI-compatible `/v1/chat/completions`
//! endpoint (tiergate, llama.cpp's `llama-server`, vLLM, ...).
//!
//! Two shapes of load, each run as one *level* per model:
//! - **closed loop**: `concurrency` workers send streaming requests back to back, so the
//!   server's speed sets the request rate (what throughput comparisons want);
//! - **open loop**: requests arrive at a fixed mean rate with exponential gaps (a Poisson
//!   process) whether or not earlier ones have finished, as real users do. Only an open
//!   loop shows what overload does to latency: a closed loop slows its own arrivals down.
//!
//! A level ends after its request count or its duration, whichever comes first; requests
//! in flight then finish. Per request it measures the time to the first content chunk
//! (TTFT), the gaps between content chunks (inter-token latency) and the end-to-end time,
//! and it records the status code and tiergate's `x-tiergate-*` headers when present.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::{presets, ContentArrangement, Table};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};
use rand_distr::Exp;
use serde::Serialize;
use serde_json::{json, Value};

pub mod chat;

/// Prompts of roughly 32 tokens once templated, asking for long answers so that most
/// requests run to `max_tokens` (the llama.cpp batched-bench reference shape).
const DEFAULT_PROMPTS: [&str; 8] = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious child.",
    "Describe a walk through a busy market in a coastal town on a summer morning.",
    "Write a long letter from a sailor to his family about life at sea.",
    "Tell a detailed story about a robot learning to paint landscapes in the mountains.",
    "Describe the history of bread making from ancient times to modern bakeries.",
    "Write a long diary entry of an explorer crossing a desert on a camel.",
    "Explain how rivers shape valleys over millions of years, with many examples.",
];

/// How requests arrive during one level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Load {
    /// `concurrency` workers, each sending its next request when the last one ends.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` requests per second.
    Open { rate: f64 },
}

impl Load {
    /// Requests per level when neither a count nor a duration is given: enough for a
    /// p99 to mean something without making a slow level take forever.
    fn default_requests(self) -> usize {
        match self {
            Load::Closed { concurrency } => (4 * concurrency).max(16),
            Load::Open { rate } => ((rate * 30.0).ceil() as usize).max(16),
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Closed { concurrency } => write!(f, "{concurrency} concurrent"),
            Load::Open { rate } => write!(f, "{rate}/s Poisson"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub models: Vec<String>,
    pub loads: Vec<Load>,
    /// Requests per level; `None` means the load's default, or unbounded with a duration.
    pub requests: Option<usize>,
    /// Stop starting requests after this long.
    pub duration: Option<Duration>,
    /// Each entry is a `messages` array; requests take them in turn.
    pub prompts: Vec<Value>,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Ask for exactly `max_tokens` (llama.cpp and tiergate honour `ignore_eos`), so
    /// levels and servers are compared on equal work.
    pub ignore_eos: bool,
    pub api_key: Option<String>,
    /// Extra request headers, e.g. tiergate's routing hint.
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    /// Report the share of successful requests whose TTFT was within this budget.
    pub ttft_budget: Option<Duration>,
    /// Seed for the open-loop arrival times, for repeatable runs.
    pub seed: Option<u64>,
    /// Draw a progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl BenchOptions {
    /// Options with the built-in prompts and everything else at its default.
    pub fn new(url: impl Into<String>, models: Vec<String>, loads: Vec<Load>) -> Self {
        Self {
            url: url.into(),
            models,
            loads,
            requests: None,
            duration: None,
            prompts: default_prompts(),
            max_tokens: 64,
            temperature: 0.8,
            ignore_eos: true,
            api_key: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(300),
            ttft_budget: None,
            seed: None,
            progress: false,
        }
    }

    /// The `messages` of request `index`: the prompts in turn.
    fn prompt(&self, index: usize) -> &Value {
        &self.prompts[index % self.prompts.len()]
    }
}

/// The built-in prompts as `messages` arrays.
pub fn default_prompts() -> Vec<Value> {
    DEFAULT_PROMPTS
        .iter()
        .map(|p| json!([{"role": "user", "content": p}]))
        .collect()
}

/// Reads prompts from a file: one per line, either plain text (sent as one user message)
/// or a JSON line holding a `messages` array or an object with a `messages` field.
/// Blank lines are skipped.
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts from {}", path.display()))?;
    let prompts = parse_prompts(&text).with_context(|| format!("in {}", path.display()))?;
    anyhow::ensure!(!prompts.is_empty(), "{} has no prompts", path.display());
    Ok(prompts)
}

fn parse_prompts(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut prompts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let line_no = index + 1;
        let messages = if line.starts_with('[') || line.starts_with('{') {
            let value: Value = serde_json::from_str(line)
                .with_context(|| format!("line {line_no}: not valid JSON"))?;
            let messages = match value {
                Value::Object(mut object) => object.remove("messages").unwrap_or(Value::Null),
                array => array,
            };
            anyhow::ensure!(
                messages.as_array().is_some_and(|m| !m.is_empty()),
                "line {line_no}: expected a non-empty messages array"
            );
            messages
        } else {
            json!([{"role": "user", "content": line}])
        };
        prompts.push(messages);
    }
    Ok(prompts)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// TTFT against a budget, over the requests the server admitted (status 200).
#[derive(Debug, Serialize)]
pub struct BudgetReport {
    pub ttft_budget_ms: f64,
    pub admitted: usize,
    pub met: usize,
    /// `met / admitted`; `None` when nothing was admitted.
    pub fraction_met: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub load: Load,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered with 200 and a complete stream.
    pub ok: usize,
    /// Every request by status code; `transport` for connection failures and timeouts,
    /// `stream_error` for a 200 whose stream carried an error event or broke off.
    pub statuses: BTreeMap<String, usize>,
    /// What went wrong, for requests that failed without an HTTP status or mid-stream.
    pub errors: BTreeMap<String, usize>,
    pub ttft_ms: Option<Percentiles>,
    pub inter_token_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
    pub completion_tokens: u64,
    pub wall_s: f64,
    pub output_tokens_per_s: f64,
    /// Requests started per second over the level (the offered load in an open loop).
    pub request_rate: f64,
    pub budget: Option<BudgetReport>,
    /// tiergate's `x-tiergate-tier` of successful requests.
    pub tiers: BTreeMap<String, usize>,
    /// tiergate's `x-tiergate-cache` (hit, stale, shared, miss).
    pub cache: BTreeMap<String, usize>,
    /// tiergate's `x-tiergate-degraded`, e.g. `full->fast; reason=predicted_ttft`.
    pub degraded: BTreeMap<String, usize>,
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

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Complete,
    Status(u16),
    Transport,
    StreamError,
}

impl Outcome {
    fn label(&self) -> String {
        match self {
            Outcome::Complete => "200".to_owned(),
            Outcome::Status(code) => code.to_string(),
            Outcome::Transport => "transport".to_owned(),
            Outcome::StreamError => "stream_error".to_owned(),
        }
    }
}

/// What one streamed request measured.
#[derive(Debug)]
struct RequestSample {
    outcome: Outcome,
    error: Option<String>,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    e2e: Duration,
    completion_tokens: u64,
    tier: Option<String>,
    cache: Option<String>,
    degraded: Option<String>,
    /// The reply's text, for a conversation to carry into its next turn.
    content: String,
    /// `usage.prompt_tokens` and `usage.prompt_tokens_details.cached_tokens`, when sent.
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
}

impl RequestSample {
    fn failed(outcome: Outcome, sent: Instant) -> Self {
        Self {
            outcome,
            error: None,
            ttft: None,
            gaps: Vec::new(),
            e2e: sent.elapsed(),
            completion_tokens: 0,
            tier: None,
            cache: None,
            degraded: None,
            content: String::new(),
            prompt_tokens: None,
            cached_tokens: None,
        }
    }
}

/// Shared by every request of a run.
struct Shared {
    client: reqwest::Client,
    options: BenchOptions,
    endpoint: String,
}

impl Shared {
    fn new(options: BenchOptions) -> anyhow::Result<Arc<Self>> {
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            // A fresh connection per request, as from many independent users. Reusing idle
            // keep-alive connections races servers that close them (llama-server does): the
            // request then fails with "connection closed before message completed", an
            // artefact of the tool rather than the server's fault.
            .pool_max_idle_per_host(0)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Arc::new(Self {
            client,
            endpoint: chat_endpoint(&options.url),
            options,
        }))
    }
}

pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(!options.prompts.is_empty(), "no prompts to send");
    anyhow::ensure!(!options.loads.is_empty(), "no load levels to run");
    for load in &options.loads {
        match *load {
            Load::Closed { concurrency } => {
                anyhow::ensure!(concurrency > 0, "concurrency must be at least 1")
            }
            Load::Open { rate } => anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "the request rate must be a positive number, not {rate}"
            ),
        }
    }
    let shared = Shared::new(options)?;
    let mut models = Vec::new();
    for model in &shared.options.models {
        let mut levels = Vec::new();
        for &load in &shared.options.loads {
            levels.push(run_level(&shared, model, load).await);
        }
        models.push(ModelReport {
            model: model.clone(),
            levels,
        });
    }
    Ok(BenchReport {
        url: shared.options.url.clone(),
        max_tokens: shared.options.max_tokens,
        models,
    })
}

/// When a level stops starting requests.
#[derive(Debug, Clone, Copy)]
struct Limit {
    count: Option<usize>,
    until: Option<Instant>,
}

impl Limit {
    fn allows(&self, index: usize) -> bool {
        self.count.is_none_or(|count| index < count)
            && self.until.is_none_or(|until| Instant::now() < until)
    }
}

async fn run_level(shared: &Arc<Shared>, model: &str, load: Load) -> LevelReport {
    let options = &shared.options;
    let count = match (options.requests, options.duration) {
        (Some(count), _) => Some(count),
        (None, Some(_)) => None,
        (None, None) => Some(load.default_requests()),
    };
    let started = Instant::now();
    let limit = Limit {
        count,
        until: options.duration.map(|d| started + d),
    };
    let progress = progress_bar(options, model, load, limit.count);
    let samples = match load {
        Load::Closed { concurrency } => {
            closed_loop(shared, model, concurrency, limit, &progress).await
        }
        Load::Open { rate } => open_loop(shared, model, rate, limit, &progress).await,
    };
    progress.finish_and_clear();
    summarize(load, samples, started.elapsed(), options.ttft_budget)
}

fn progress_bar(
    options: &BenchOptions,
    model: &str,
    load: Load,
    count: Option<usize>,
) -> ProgressBar {
    if !options.progress {
        return ProgressBar::hidden();
    }
    let prefix = format!("{model} @ {load}");
    match count {
        Some(count) => ProgressBar::new(count as u64).with_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{prefix} {spinner} [{elapsed_precise}] {pos} done {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    }
    .with_prefix(prefix)
}

async fn closed_loop(
    shared: &Arc<Shared>,
    model: &str,
    concurrency: usize,
    limit: Limit,
    progress: &ProgressBar,
) -> Vec<RequestSample> {
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let workers = (0..concurrency).map(|_| async {
        let mut samples = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if !limit.allows(index) {
                return samples;
            }
            let sample = one_request(shared, model, shared.options.prompt(index)).await;
            note_progress(progress, &failures, &sample);
            samples.push(sample);
        }
    });
    futures::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn open_loop(
    shared: &Arc<Shared>,
    model: &str,
    rate: f64,
    limit: Limit,
    progress: &ProgressBar,
) -> Vec<RequestSample> {
    let mut rng = match shared.options.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    // `rate` was checked positive and finite in `run`, which is all `Exp` needs.
    let gaps = Exp::new(rate).unwrap_or_else(|_| unreachable!("rate is positive"));
    let failures = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let mut arrival = Duration::ZERO;
    let mut in_flight = Vec::new();
    for index in 0.. {
        arrival += Duration::from_secs_f64(rng.sample(gaps));
        tokio::time::sleep_until(start + arrival).await;
        if !limit.allows(index) {
            break;
        }
        let (shared, model) = (shared.clone(), model.to_owned());
        let (progress, failures) = (progress.clone(), failures.clone());
        in_flight.push(tokio::spawn(async move {
            let sample = one_request(&shared, &model, shared.options.prompt(index)).await;
            note_progress(&progress, &failures, &sample);
            sample
        }));
    }
    let mut samples = Vec::with_capacity(in_flight.len());
    for task in in_flight {
        match task.await {
            Ok(sample) => samples.push(sample),
            // Only a panic in one_request gets here; count it as a failed request.
            Err(_) => samples.push(RequestSample::failed(Outcome::Transport, Instant::now())),
        }
    }
    samples
}

fn note_progress(progress: &ProgressBar, failures: &AtomicUsize, sample: &RequestSample) {
    if sample.outcome != Outcome::Complete {
        let failed = failures.fetch_add(1, Ordering::Relaxed) + 1;
        progress.set_message(format!("{failed} failed"));
    }
    progress.inc(1);
}

fn summarize(
    load: Load,
    samples: Vec<RequestSample>,
    wall: Duration,
    ttft_budget: Option<Duration>,
) -> LevelReport {
    let mut statuses = BTreeMap::new();
    let mut tiers = BTreeMap::new();
    let mut cache = BTreeMap::new();
    let mut degraded = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for sample in &samples {
        *statuses.entry(sample.outcome.label()).or_insert(0) += 1;
        if let Some(error) = &sample.error {
            *errors.entry(error.clone()).or_insert(0) += 1;
        }
        for (header, counts) in [
            (&sample.tier, &mut tiers),
            (&sample.cache, &mut cache),
            (&sample.degraded, &mut degraded),
        ] {
            if let Some(value) = header {
                *counts.entry(value.clone()).or_insert(0) += 1;
            }
        }
    }
    let complete: Vec<&RequestSample> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Complete)
        .collect();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let ttft: Vec<f64> = complete
        .iter()
        .filter_map(|s| s.ttft.as_ref().map(ms))
        .collect();
    let budget = ttft_budget.map(|budget| {
        let met = complete
            .iter()
            .filter(|s| s.ttft.is_some_and(|t| t <= budget))
            .count();
        BudgetReport {
            ttft_budget_ms: ms(&budget),
            admitted: complete.len(),
            met,
            fraction_met: (!complete.is_empty()).then(|| met as f64 / complete.len() as f64),
        }
    });
    let gaps: Vec<f64> = complete
        .iter()
        .flat_map(|s| s.gaps.iter().map(ms))
        .collect();
    let e2e: Vec<f64> = complete.iter().map(|s| ms(&s.e2e)).collect();
    let completion_tokens: u64 = complete.iter().map(|s| s.completion_tokens).sum();
    let wall_s = wall.as_secs_f64().max(1e-9);
    LevelReport {
        load,
        requests: samples.len(),
        ok: complete.len(),
        statuses,
        errors,
        ttft_ms: percentiles(ttft),
        inter_token_ms: percentiles(gaps),
        e2e_ms: percentiles(e2e),
        completion_tokens,
        wall_s: round2(wall_s),
        output_tokens_per_s: round2(completion_tokens as f64 / wall_s),
        request_rate: round2(samples.len() as f64 / wall_s),
        budget,
        tiers,
        cache,
        degraded,
    }
}

/// One streaming request.
async fn one_request(shared: &Shared, model: &str, messages: &Value) -> RequestSample {
    let options = &shared.options;
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if options.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let mut request = shared.client.post(&shared.endpoint).json(&body);
    if let Some(key) = &options.api_key {
        request = request.bearer_auth(key);
    }
    for (name, value) in &options.headers {
        request = request.header(name, value);
    }
    let sent = Instant::now();
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => {
            return RequestSample {
                error: Some(error_chain(&err)),
                ..RequestSample::failed(Outcome::Transport, sent)
            }
        }
    };
    let status = response.status();
    if !status.is_success() {
        return RequestSample::failed(Outcome::Status(status.as_u16()), sent);
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut sample = RequestSample {
        tier: header("x-tiergate-tier"),
        cache: header("x-tiergate-cache"),
        degraded: header("x-tiergate-degraded"),
        ..RequestSample::failed(Outcome::StreamError, sent)
    };
    let mut last_content: Option<Instant> = None;
    let mut content_chunks = 0u64;
    let mut done = false;
    let mut buffer: Vec<u8> = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(err) => {
                sample.e2e = sent.elapsed();
                sample.error = Some(error_chain(&err));
                return sample;
            }
        };
        buffer.extend_from_slice(&piece);
        while let Some(end) = find_event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(error) = chunk.get("error") {
                    sample.e2e = sent.elapsed();
                    sample.error = Some(format!("error event: {}", error["message"]));
                    return sample;
                }
                let usage = &chunk["usage"];
                if let Some(tokens) = usage["completion_tokens"].as_u64() {
                    sample.completion_tokens = tokens;
                }
                if let Some(tokens) = usage["prompt_tokens"].as_u64() {
                    sample.prompt_tokens = Some(tokens);
                }
                if let Some(tokens) = usage["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    sample.cached_tokens = Some(tokens);
                }
                let content = chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("");
                sample.content.push_str(content);
                if !content.is_empty() {
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
    if done {
        sample.outcome = Outcome::Complete;
    }
    // Servers that ignore include_usage: count content chunks (about one per token).
    if sample.completion_tokens == 0 {
        sample.completion_tokens = content_chunks;
    }
    sample
}

/// An error with its causes, e.g. "error sending request: connection closed before
/// message completed".
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n")
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Nearest-rank percentiles; `None` for no data.
fn percentiles(mut values: Vec<f64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        let index = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
        round2(values[index])
    };
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    Some(Percentiles {
        min: round2(values[0]),
        p50: rank(0.50),
        p90: rank(0.90),
        p95: rank(0.95),
        p99: rank(0.99),
        max: round2(values[values.len() - 1]),
        mean: round2(mean),
    })
}

/// The report as a table for people; `--json` gives the same numbers to tools.
pub fn table(report: &BenchReport) -> Table {
    let mut table = Table::new();
    table
        .load_style(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "model",
            "load",
            "sent",
            "ok",
            "statuses",
            "TTFT ms p50/p90/p99",
            "ITL ms p50/p99",
            "E2E ms p50/p99",
            "out tok/s",
            "TTFT in budget",
            "tiers · cache · degraded",
        ]);
    let dash = || "-".to_owned();
    for model in &report.models {
        for level in &model.levels {
            let counts = |map: &BTreeMap<String, usize>| {
                map.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let budget = level.budget.as_ref().map_or_else(dash, |b| {
                let share = b
                    .fraction_met
                    .map_or_else(dash, |f| format!("{:.1}%", f * 100.0));
                format!(
                    "{share} ({}/{} ≤ {} ms)",
                    b.met, b.admitted, b.ttft_budget_ms
                )
            });
            let routing = [&level.tiers, &level.cache, &level.degraded]
                .into_iter()
                .map(counts)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" · ");
            table.add_row([
                model.model.clone(),
                level.load.to_string(),
                level.requests.to_string(),
                level.ok.to_string(),
                counts(&level.statuses),
                level.ttft_ms.as_ref().map_or_else(dash, |p| {
                    format!("{:.0} / {:.0} / {:.0}", p.p50, p.p90, p.p99)
                }),
                level
                    .inter_token_ms
                    .as_ref()
                    .map_or_else(dash, |p| format!("{:.1} / {:.1}", p.p50, p.p99)),
                level
                    .e2e_ms
                    .as_ref()
                    .map_or_else(dash, |p| format!("{:.0} / {:.0}", p.p50, p.p99)),
                format!("{:.1}", level.output_tokens_per_s),
                budget,
                if routing.is_empty() { dash() } else { routing },
            ]);
        }
    }
    table
}

/// The chat endpoint under a base URL given with or without `/v1` (OpenAI SDKs take
/// `http://host:port/v1`, many tools `http://host:port`).
fn chat_endpoint(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}/v1/chat/completions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_may_end_in_v1_or_a_slash() {
        for base in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            assert_eq!(
                chat_endpoint(base),
                "http://h:1/v1/chat/completions",
                "{base}"
            );
        }
        assert_eq!(
            chat_endpoint("http://h:1/proxy/v1"),
            "http://h:1/proxy/v1/chat/completions"
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=100).map(f64::from).collect()).expect("data");
        assert_eq!((p.p50, p.p90, p.p95, p.p99), (50.0, 90.0, 95.0, 99.0));
        assert_eq!((p.min, p.max, p.mean), (1.0, 100.0, 50.5));
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn single_value_is_every_percentile() {
        let p = percentiles(vec![7.0]).expect("data");
        assert_eq!((p.min, p.p50, p.p99, p.max), (7.0, 7.0, 7.0, 7.0));
    }

    #[test]
    fn prompt_files_take_text_lines_message_arrays_and_request_objects() {
        let text = "Hello there\n\n\
            [{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"Hi\"}]\n\
            {\"messages\":[{\"role\":\"user\",\"content\":\"Yo\"}],\"max_tokens\":3}\n";
        let prompts = parse_prompts(text).expect("valid");
        assert_eq!(prompts.len(), 3);
        assert_eq!(
            prompts[0],
            json!([{"role": "user", "content": "Hello there"}])
        );
        assert_eq!(prompts[1][0]["role"], "system");
        assert_eq!(prompts[2], json!([{"role": "user", "content": "Yo"}]));
    }

    #[test]
    fn bad_prompt_lines_name_their_line() {
        let err = parse_prompts("fine\n{\"messages\": []}\n").expect_err("empty messages");
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = parse_prompts("[not json\n").expect_err("bad json");
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }

    #[test]
    fn budget_counts_only_admitted_requests() {
        let sample = |outcome: Outcome, ttft_ms: Option<u64>| RequestSample {
            ttft: ttft_ms.map(Duration::from_millis),
            ..RequestSample::failed(outcome, Instant::now())
        };
        let samples = vec![
            sample(Outcome::Complete, Some(100)),
            sample(Outcome::Complete, Some(900)),
            sample(Outcome::Complete, Some(300)),
            sample(Outcome::Status(503), None),
        ];
        let report = summarize(
            Load::Open { rate: 1.0 },
            samples,
            Duration::from_secs(2),
            Some(Duration::from_millis(500)),
        );
        let budget = report.budget.expect("budget asked for");
        assert_eq!((budget.admitted, budget.met), (3, 2));
        assert_eq!(budget.fraction_met, Some(2.0 / 3.0));
        assert_eq!(report.statuses["503"], 1);
        assert_eq!(report.statuses["200"], 3);
        assert_eq!(report.request_rate, 2.0);
    }

    #[test]
    fn limits_stop_at_the_count_or_the_deadline() {
        let by_count = Limit {
            count: Some(2),
            until: None,
        };
        assert!(by_count.allows(1) && !by_count.allows(2));
        let past = Limit {
            count: None,
            until: Some(Instant::now()),
        };
        assert!(!past.allows(0));
    }
}
