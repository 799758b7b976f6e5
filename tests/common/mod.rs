//! A real tiergate on 127.0.0.1:0 with the real models, for integration tests.
#![allow(dead_code)] // each test binary uses a different part of this harness

pub mod binary;
pub mod upstream;

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tiergate::config::{Config, ModelConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const FAST: &str = "smollm2-135m-instruct";
pub const FULL: &str = "gemma-3-270m";

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The shipped config, so tests exercise the real model paths and templates.
pub fn shipped_config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiergate.toml");
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Keeps only the fast model, with a policy that routes everything to it (the default
/// policy names the full tier, which would then be an unknown tier).
pub fn only_fast_tier(config: &mut Config) {
    config.models.retain(|m| m.id == FAST);
    config.router.policies = vec![fixture("fast-only.toml")];
}

/// A file under `tests/fixtures`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

impl TestServer {
    /// Only the fast tier: most API behaviour does not depend on the model.
    pub async fn fast() -> Self {
        Self::start(only_fast_tier).await
    }

    /// Both default tiers.
    pub async fn both() -> Self {
        Self::start(|_| {}).await
    }

    pub async fn start(edit: impl FnOnce(&mut Config)) -> Self {
        let server = Self::launch(edit).await;
        server.wait_ready().await;
        server
    }

    /// Like [`Self::start`], without waiting for `/ready` (for tiers meant to be down).
    pub async fn launch(edit: impl FnOnce(&mut Config)) -> Self {
        let mut config = shipped_config();
        for model in &mut config.models {
            // Tests run two at a time on a 2-core machine: one thread per model keeps them
            // from oversubscribing the cores.
            model.threads = 1;
            // 8 slots of 1024 cells: enough for every test, small enough to load fast.
            model.slots = 8;
            model.n_ctx = 8 * 1024;
            // Tests compare greedy replies across requests. A reused prefix leaves only
            // the prompt's tail to prefill, and llama.cpp's kernels differ in the last
            // bits between batch sizes, so a near-tie can flip (llama-server documents
            // the same for `cache_prompt`). tests/prefix_cache.rs turns it back on.
            model.prefix_cache = false;
        }
        edit(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tiergate::server::run(listener, config, async {
            let _ = shutdown_rx.await;
        }));
        Self {
            base,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown_tx),
            task,
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(resp) = self.client.get(self.url("/ready")).send().await {
                if resp.status() == 200 {
                    return;
                }
            }
            assert!(
                !self.task.is_finished(),
                "server stopped before it was ready"
            );
            assert!(
                Instant::now() < deadline,
                "models did not load within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_chat(&self, body: &Value) -> reqwest::Response {
        self.post_as(None, None, body).await
    }

    /// Sends a chat request with an API key and a route hint (`x-tiergate-route-hint`).
    pub async fn post_as(
        &self,
        api_key: Option<&str>,
        hint: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url("/v1/chat/completions"));
        if let Some(api_key) = api_key {
            request = request.bearer_auth(api_key);
        }
        if let Some(hint) = hint {
            request = request.header("x-tiergate-route-hint", hint);
        }
        request.json(body).send().await.expect("request sent")
    }

    /// Non-streaming completion that must succeed.
    pub async fn complete(&self, body: Value) -> Value {
        let resp = self.post_chat(&body).await;
        let status = resp.status();
        let json: Value = resp.json().await.expect("json body");
        assert_eq!(status, 200, "{json}");
        json
    }

    /// Streaming completion: every `data:` payload in order (including `[DONE]`).
    pub async fn stream(&self, mut body: Value) -> Vec<String> {
        body["stream"] = json!(true);
        let resp = self.post_chat(&body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().expect("ascii"),
            "text/event-stream"
        );
        let raw = resp.text().await.expect("body");
        parse_sse(&raw)
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The value of one sample line in `/metrics`, e.g. `tiergate_active_sequences{model="x",tier="fast"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
    }

    /// Waits until a sample reaches `value`: the step loop retires a sequence at the end of
    /// its step, just after the client has read the last event.
    pub async fn wait_for_metric(&self, sample: &str, value: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let current = self.metric(sample).await;
            if current == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} is {current:?}, not {value}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // The server frees its models before it returns (up to 10 s per model).
        let stopped = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        assert!(stopped.is_ok(), "server did not stop within 30 s");
    }
}

/// Splits an SSE body into its `data:` payloads, checking the framing on the way.
pub fn parse_sse(raw: &str) -> Vec<String> {
    let mut payloads = Vec::new();
    for event in raw.split("\n\n").filter(|e| !e.is_empty()) {
        for line in event.lines() {
            let payload = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event line without `data: `: {line:?}"));
            payloads.push(payload.to_owned());
        }
    }
    payloads
}

/// Concatenated `delta.content` of a streamed reply.
pub fn streamed_text(payloads: &[String]) -> String {
    payloads
        .iter()
        .filter(|p| p.as_str() != "[DONE]")
        .filter_map(|p| {
            let chunk: Value = serde_json::from_str(p).expect("chunk json");
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

pub fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

/// A request body for a greedy (temperature 0) reply from `model`.
pub fn greedy(model: &str, content: &str, max_tokens: u32) -> Value {
    json!({"model": model, "messages": user(content), "temperature": 0, "max_tokens": max_tokens})
}

/// A response header as text.
pub fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Polls `condition` every 50 ms until it holds; fails the test after `within`.
pub async fn wait_until<F, Fut>(within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads at least `at_least` bytes of a streaming body, leaving the rest unread.
pub async fn read_at_least<S>(body: &mut S, at_least: usize) -> Vec<u8>
where
    S: futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
{
    let mut seen = Vec::new();
    while seen.len() < at_least {
        match body.next().await {
            Some(Ok(bytes)) => seen.extend_from_slice(&bytes),
            _ => break,
        }
    }
    seen
}

pub fn fast_model(config: &Config) -> &ModelConfig {
    config
        .models
        .iter()
        .find(|m| m.id == FAST)
        .expect("fast model in config")
}
