//! What tiergate adds when it proxies a remote tier: time to first token and per-chunk
//! latency, p50 and p99, through the gateway against calling the upstream directly, at
//! several numbers of concurrent streams.
//!
//! The upstream is a fast scripted OpenAI-compatible server in this process: it streams
//! `TIERGATE_PROXY_CHUNKS` pieces (default 16) `TIERGATE_PROXY_GAP_MS` apart (default
//! 20), each carrying the time it was sent, so the client measures every chunk's latency
//! from the upstream's send to its own receipt. The same client, upstream and request
//! go direct and through a gateway whose only tier is a fleet of that one endpoint.
//! Everything shares this machine's cores, so at high concurrency the figures include
//! the contention of client, gateway and upstream with each other.
//!
//!     cargo bench --bench proxy                      # 1, 64 and 512 streams
//!     TIERGATE_PROXY_STREAMS=1,16 cargo bench --bench proxy

#[path = "../tests/common/upstream.rs"]
#[allow(dead_code)] // the fault scripts serve the tests
mod upstream;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{json, Value};
use tiergate::config::Config;
use tokio::sync::Mutex;
use upstream::{unix_nanos, Script, ScriptedUpstream};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

/// One path's measurements at one concurrency.
#[derive(Default)]
struct Sample {
    ttft: Vec<Duration>,
    chunk: Vec<Duration>,
    errors: usize,
}

async fn run() -> anyhow::Result<()> {
    let chunks: usize = env_or("TIERGATE_PROXY_CHUNKS", 16);
    let gap = Duration::from_millis(env_or("TIERGATE_PROXY_GAP_MS", 20));
    let streams: Vec<usize> = std::env::var("TIERGATE_PROXY_STREAMS")
        .unwrap_or_else(|_| "1,64,512".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let upstream = ScriptedUpstream::start(Script::Stamped { count: chunks, gap }).await;
    let (gateway, stop) = start_gateway(&upstream.url).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .tcp_nodelay(true)
        .build()?;
    let direct_url = format!("{}/chat/completions", upstream.url);
    let via_url = format!("{gateway}/v1/chat/completions");
    println!(
        "proxy overhead: {chunks} chunks {} ms apart per stream; ms; \"added\" is the \
         gateway's figure minus the direct one",
        gap.as_millis()
    );
    println!(
        "{:>7} {:>8} {:>8} | {:>9} {:>9} | {:>9} {:>9} | {:>6}",
        "streams", "path", "requests", "ttft p50", "ttft p99", "chunk p50", "chunk p99", "errors"
    );
    for &concurrency in &streams {
        let requests = (concurrency * 4).max(200);
        // Warm both paths' connection pools at this concurrency first.
        measure(&client, &direct_url, concurrency, concurrency).await;
        measure(&client, &via_url, concurrency, concurrency).await;
        let direct = measure(&client, &direct_url, concurrency, requests).await;
        let via = measure(&client, &via_url, concurrency, requests).await;
        for (path, sample) in [("direct", &direct), ("tiergate", &via)] {
            println!(
                "{concurrency:>7} {path:>8} {requests:>8} | {:>9.3} {:>9.3} | {:>9.3} {:>9.3} | {:>6}",
                ms(percentile(&sample.ttft, 0.50)),
                ms(percentile(&sample.ttft, 0.99)),
                ms(percentile(&sample.chunk, 0.50)),
                ms(percentile(&sample.chunk, 0.99)),
                sample.errors,
            );
        }
        let added = |f: fn(&Sample) -> &Vec<Duration>, q| {
            ms(percentile(f(&via), q)) - ms(percentile(f(&direct), q))
        };
        println!(
            "{concurrency:>7} {:>8} {:>8} | {:>9.3} {:>9.3} | {:>9.3} {:>9.3} |",
            "added",
            "",
            added(|s| &s.ttft, 0.50),
            added(|s| &s.ttft, 0.99),
            added(|s| &s.chunk, 0.50),
            added(|s| &s.chunk, 0.99),
        );
    }
    let _ = stop.send(());
    Ok(())
}

/// A gateway on a free port whose one tier is a fleet of the upstream at `url`.
async fn start_gateway(url: &str) -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = format!(
        r#"
[server]
max_connections = 4096

[router]
policies = ["{root}/benches/proxy-policy.toml"]
watch = false

[[model]]
id = "scripted"
tier = "fast"
endpoints = ["{url}"]
max_outstanding = 4096
"#
    );
    let config = Config::parse(Path::new("/tmp/proxy-bench.toml"), &text)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tiergate::server::run(listener, config, async {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let ready = client.get(format!("{base}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return Ok((base, stop_tx));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the gateway was not ready within 5 s")
}

/// `requests` streams, `concurrency` at a time.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    requests: usize,
) -> Sample {
    let sample = Arc::new(Mutex::new(Sample::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, sample, next) =
                (client.clone(), url.to_owned(), sample.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                    let result = one_stream(&client, &url).await;
                    let mut sample = sample.lock().await;
                    match result {
                        Ok((ttft, chunks)) => {
                            sample.ttft.push(ttft);
                            sample.chunk.extend(chunks);
                        }
                        Err(_) => sample.errors += 1,
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    Arc::try_unwrap(sample)
        .map(Mutex::into_inner)
        .unwrap_or_default()
}

/// One streamed request: time to its first text chunk, and each chunk's latency from the
/// upstream's send to its arrival here.
async fn one_stream(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let body = json!({"model": "scripted", "stream": true, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say something."}]});
    let started = Instant::now();
    let response = client.post(url).json(&body).send().await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    let mut events = response.bytes_stream().eventsource();
    let mut ttft = None;
    let mut latencies = Vec::new();
    while let Some(event) = events.next().await {
        let event = event?;
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data)?;
        let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() else {
            continue;
        };
        let Ok(sent) = text.trim().parse::<u128>() else {
            continue;
        };
        let now = unix_nanos();
        ttft.get_or_insert_with(|| started.elapsed());
        latencies.push(Duration::from_nanos(now.saturating_sub(sent) as u64));
    }
    let ttft = ttft.ok_or_else(|| anyhow::anyhow!("no text"))?;
    Ok((ttft, latencies))
}

fn percentile(values: &[Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
