//! What tiergate adds when it proxies a remote tier: time to first token and per-chunk
//! latency, p50 and p99, through the gateway against calling the upstream directly, at
//! several numbers of concurrent streams.
//!
//! The upstream is a fast scripted OpenAI-compatible server in this process: it streams
//! `TIERGATE_PROXY_CHUNKS` pieces (default 16) `TIERGATE_PROXY_GAP_MS` apart (default
//! 20), each carrying the time it was sent, so the client measures every chunk's latency
//! from the upstream's send to its own receipt. The same client, upstream and request
//! go direct and through a gateway (the `tiergate` binary, in a process of its own) whose
//! only tier is a fleet of that one endpoint.
//! Streams start spread over one stream's length, then each worker starts its next as
//! soon as one ends. Everything shares this machine's cores, so at high concurrency the
//! figures include the contention of client, gateway and upstream with each other.
//!
//!     cargo bench --bench proxy                      # 1, 64 and 512 streams
//!     TIERGATE_PROXY_STREAMS=1,16 cargo bench --bench proxy

#[path = "common/gateway_process.rs"]
mod gateway_process;
#[path = "../tests/common/upstream.rs"]
#[allow(dead_code)] // the fault scripts serve the tests
mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use gateway_process::GatewayProcess;
use serde_json::{json, Value};
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
    let stream_time = gap * chunks as u32;
    let gateway = Gateway::start(&upstream.url).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .tcp_nodelay(true)
        .build()?;
    let direct_url = format!("{}/chat/completions", upstream.url);
    let via_url = format!("{}/v1/chat/completions", gateway.process.base);
    println!(
        "proxy overhead: {chunks} chunks {} ms apart per stream; ms; \"added\" is the \
         gateway's figure minus the direct one",
        gap.as_millis()
    );
    println!(
        "{:>7} {:>8} {:>8} | {:>9} {:>9} | {:>9} {:>9} | {:>6}",
        "streams", "path", "requests", "ttft p50", "ttft p99", "chunk p50", "chunk p99", "errors"
    );
    let mut cpu = Vec::new();
    for &concurrency in &streams {
        let requests = (concurrency * 4).max(200);
        // Warm both paths' connection pools at this concurrency first.
        measure(&client, &direct_url, concurrency, concurrency, stream_time).await;
        measure(&client, &via_url, concurrency, concurrency, stream_time).await;
        let direct = measure(&client, &direct_url, concurrency, requests, stream_time).await;
        let cpu_before = gateway.process.cpu_time();
        let via = measure(&client, &via_url, concurrency, requests, stream_time).await;
        let gateway_cpu = gateway.process.cpu_time().saturating_sub(cpu_before);
        cpu.push((concurrency, gateway_cpu, requests, via.chunk.len()));
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
    // What the gateway's own process spent: per request, and per request and chunk
    // together spread over the chunks (the two cannot be told apart from outside).
    println!("gateway CPU (its own process, user + system):");
    for (concurrency, spent, requests, chunks) in cpu {
        println!(
            "{concurrency:>7} streams: {:.0} ms for {requests} requests and {chunks} chunks: \
             {:.0} µs a request, {:.1} µs a chunk",
            ms(spent),
            spent.as_secs_f64() * 1e6 / requests as f64,
            spent.as_secs_f64() * 1e6 / chunks.max(1) as f64,
        );
    }
    Ok(())
}

/// The `tiergate` binary with one tier: a fleet of the upstream at `url`.
struct Gateway {
    process: GatewayProcess,
    /// Holds the config file while the gateway runs.
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let root = env!("CARGO_MANIFEST_DIR");
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("tiergate.toml");
        std::fs::write(
            &config,
            format!(
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
            ),
        )?;
        let process = GatewayProcess::spawn(&config, Some("warn"))?;
        process.wait_ready(Duration::from_secs(10)).await?;
        Ok(Self { process, _dir: dir })
    }
}

/// `requests` streams, `concurrency` at a time. The workers start `stream_time /
/// concurrency` apart, so that streams begin and end spread over time as real traffic
/// does, instead of all at once in lockstep (which measures one burst's queue).
async fn measure(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    requests: usize,
    stream_time: Duration,
) -> Sample {
    let sample = Arc::new(Mutex::new(Sample::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stagger = stream_time / concurrency as u32;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (client, url, sample, next) =
                (client.clone(), url.to_owned(), sample.clone(), next.clone());
            tokio::spawn(async move {
                tokio::time::sleep(stagger * worker as u32).await;
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
