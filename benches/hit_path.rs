//! The reply-cache hit path against the floor under it: requests/s of tiergate answering a
//! cached reply, and of a bare axum handler returning the same bytes, under the same `wrk`
//! load on the same machine.
//!
//! The gateway is the `tiergate` binary on the shipped config and policies (both models
//! loaded, the default routing rules), in a process of its own. One greedy request is sent
//! once to fill the reply cache; `wrk -t1 -c16` then repeats it, non-streaming and
//! streaming. The bare handler runs in this process on a Tokio runtime built as tiergate
//! builds its own, and answers every request with the bytes tiergate's hit returned.
//! The two are measured back to back in `TIERGATE_HIT_ROUNDS` rounds (default 5) of
//! `TIERGATE_HIT_SECONDS` each (default 5); the medians, and the median of the per-round
//! ratios, are reported, since this machine's speed drifts within minutes.
//!
//!     cargo bench --bench hit_path           # needs wrk (apt-get install wrk)

#[path = "common/gateway_process.rs"]
#[allow(dead_code)] // `cpu_time` serves the proxy bench
mod gateway_process;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use gateway_process::GatewayProcess;
use serde_json::{json, Value};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(stream: bool) -> Value {
    json!({
        "model": "auto",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 32,
        "stream": stream,
    })
}

/// Sends `body` until tiergate answers it from the cache; returns the hit's body.
async fn cached_reply(gateway: &GatewayProcess, body: &Value) -> anyhow::Result<Bytes> {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gateway.base);
    for _ in 0..3 {
        let response = client.post(&url).json(body).send().await?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        let cache = response
            .headers()
            .get("x-tiergate-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response.bytes().await?;
        if cache.as_deref() == Some("hit") {
            return Ok(bytes);
        }
    }
    anyhow::bail!("the request is not answered from the cache (check the policy's `cache`)")
}

/// A bare axum server answering every POST with `reply`; returns its base URL.
fn bare_server(
    runtime: &tokio::runtime::Runtime,
    reply: Bytes,
    content_type: &'static str,
) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |_body: Bytes| {
            let reply = reply.clone();
            async move { ([(CONTENT_TYPE, content_type)], reply) }
        }),
    );
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, app).await
    });
    Ok(base)
}

/// `wrk -t1 -c16` posting `body` for `seconds`; its requests/s.
fn wrk(url: &str, body: &Value, seconds: u64) -> anyhow::Result<f64> {
    let mut script = tempfile::NamedTempFile::new()?;
    let body = serde_json::to_string(body)?;
    writeln!(
        script,
        "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"",
        serde_json::to_string(&body)?
    )?;
    let output = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{seconds}s"), "-s"])
        .arg(script.path())
        .arg(format!("{url}/v1/chat/completions"))
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run wrk ({e}); apt-get install wrk"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let clean =
        output.status.success() && !text.contains("Non-2xx") && !text.contains("Socket errors");
    anyhow::ensure!(
        clean,
        "wrk failed or saw errors:\n{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Requests/sec in wrk's output:\n{text}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = env_or("TIERGATE_HIT_SECONDS", 5);
    let rounds: usize = env_or("TIERGATE_HIT_ROUNDS", 5);
    // Built as tiergate builds its own (src/main.rs): a worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The shipped config and policies, logging as they are set to.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiergate.toml");
    let gateway = GatewayProcess::spawn(&config, None)?;
    // Both models load and warm up first.
    runtime.block_on(gateway.wait_ready(Duration::from_secs(120)))?;
    println!(
        "reply-cache hits against a bare axum handler: wrk -t1 -c16, {rounds} paired rounds \
         of {seconds} s, medians"
    );
    println!(
        "{:>10} | {:>14} | {:>14} | {:>6}",
        "request", "tiergate req/s", "bare req/s", "ratio"
    );
    for stream in [false, true] {
        let body = request(stream);
        let reply = runtime.block_on(cached_reply(&gateway, &body))?;
        let content_type = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let bare = bare_server(&runtime, reply, content_type)?;
        // The machine drifts by up to 2x within minutes: each round pairs the two runs
        // back to back, and the median of the paired ratios is the figure.
        let (mut via, mut floor, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (t, b) = (
                wrk(&gateway.base, &body, seconds)?,
                wrk(&bare, &body, seconds)?,
            );
            via.push(t);
            floor.push(b);
            ratios.push(t / b);
        }
        println!(
            "{:>10} | {:>14.0} | {:>14.0} | {:>6.2}   (ratios {})",
            if stream { "streaming" } else { "json" },
            median(&mut via),
            median(&mut floor),
            median(&mut ratios),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
