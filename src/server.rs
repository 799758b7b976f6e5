//! Start-up and serving: spawn one engine per configured model, serve HTTP at once
//! (`/ready` says 503 until every model has loaded), and stop on the caller's signal.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower_http::map_request_body::MapRequestBodyLayer;

use crate::admission::Admission;
use crate::api::{self, AppState, StateParts};
use crate::cache::{CacheCounters, ReplyCache};
use crate::config::{Config, EmbeddingConfig};
use crate::embed::{EmbedMetrics, Embedder};
use crate::engine::llama::LlamaEngine;
use crate::engine::Engine;
use crate::gateway::{Gateway, GatewayParts};
use crate::metrics::{Metrics, ModelLabels, OutcomeLabels};
use crate::remote::RemoteEngine;
use crate::router::{reload, PolicyStore};
use crate::tiers::Tiers;
use body_timeout::BodyTimeout;

mod body_timeout;

/// Loads the embedding model on a blocking thread (it reads 90 MB) and starts its thread.
async fn start_embedder(
    config: &EmbeddingConfig,
    metrics: &Metrics,
) -> anyhow::Result<Arc<Embedder>> {
    let config = config.clone();
    let metrics = EmbedMetrics {
        batch_size: Some(metrics.embedding_batch_size.clone()),
        seconds: Some(metrics.embedding_seconds.clone()),
    };
    tokio::task::spawn_blocking(move || Embedder::load(&config, metrics))
        .await
        .context("loading the embedding model panicked")?
}

/// Serves until `shutdown` resolves. Returns an error if any model fails to load, so that
/// a broken model stops the process instead of leaving it half-ready.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let embedder = match &config.embedding {
        Some(embedding) => Some(start_embedder(embedding, &metrics).await?),
        None => None,
    };
    // A policy with problems stops start-up with all of them listed. Its examples are
    // embedded here, on a blocking thread.
    let (files, tiers) = (config.router.policies.clone(), config.tiers());
    let policies = Arc::new(
        tokio::task::spawn_blocking(move || PolicyStore::load_with(files, tiers, embedder))
            .await
            .context("loading the routing policy panicked")?
            .map_err(|problems| anyhow::anyhow!("invalid routing policy:\n{problems}"))?,
    );
    let reload_counter = metrics.policy_reloads.clone();
    let _reloader = AbortOnDrop(
        reload::spawn(policies.clone(), config.router.watch, move |outcome| {
            reload_counter
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.as_str().to_owned(),
                })
                .inc();
        })
        .context("cannot watch the routing policy files")?,
    );
    let mut backends: Vec<Arc<dyn Engine>> = Vec::new();
    let mut ready_signals = Vec::new();
    let mut model_threads = Vec::new();
    // Stopped with the server: each remote model's health checks.
    let mut health_checks = Vec::new();
    for model in &config.models {
        if model.remote.is_some() {
            // Its endpoints being down is not a start-up error: `/ready` reports them,
            // and the budget planner routes around them until they come back.
            let (engine, checks) = RemoteEngine::start(model, &metrics)
                .with_context(|| format!("cannot start remote model {}", model.id))?;
            backends.push(engine);
            health_checks.push(AbortOnDrop(checks));
            continue;
        }
        let engine_metrics = metrics.engine_metrics(&ModelLabels {
            model: model.id.clone(),
            tier: model.tier.clone(),
        });
        let (engine, ready, thread) = LlamaEngine::start(model.clone(), engine_metrics)
            .with_context(|| format!("cannot start the thread for model {}", model.id))?;
        backends.push(engine);
        model_threads.push(thread);
        ready_signals.push((model.id.clone(), ready));
    }

    let cache = Arc::new(
        ReplyCache::new(
            config.cache.max_entries,
            config.cache.max_bytes,
            CacheCounters {
                evictions: metrics.cache_evictions.clone(),
            },
        )
        .with_semantic(
            config.cache.semantic_max_entries,
            config.cache.semantic_max_bytes,
        ),
    );
    let gateway = Arc::new(Gateway::new(GatewayParts {
        tiers: Tiers::new(backends),
        policies,
        admission: Admission::new(&config.api_keys),
        cache,
        metrics,
    }));
    let options = HttpOptions {
        hint_header: config.router.hint_header.clone(),
        body_limit: config.server.body_limit_bytes,
        drain_timeout: Duration::from_secs(config.server.drain_timeout_s),
        header_read_timeout: Duration::from_secs(config.server.header_read_timeout_s),
        body_read_timeout: Duration::from_secs(config.server.body_read_timeout_s),
        max_connections: config.server.max_connections,
    };
    let loading = async move {
        for (id, ready) in ready_signals {
            match ready.await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return anyhow::anyhow!("model {id} failed to load: {reason}"),
                Err(_) => {
                    return anyhow::anyhow!(
                        "model {id}: the model thread ended before it was ready"
                    )
                }
            }
        }
        tracing::info!("all models ready");
        std::future::pending().await
    };
    let outcome = serve(listener, gateway, options, shutdown, loading).await;
    // Replies are finished or abandoned: free every model before returning, so nothing
    // of llama.cpp is still running when the process exits.
    for thread in model_threads {
        thread.stop(MODEL_STOP_TIMEOUT).await;
    }
    drop(health_checks);
    outcome
}

/// The HTTP layer's own settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub hint_header: String,
    pub body_limit: usize,
    /// On shutdown, how long open replies may take to finish.
    pub drain_timeout: Duration,
    /// Headers must arrive within this of a request's start (or of the previous response
    /// on a kept-alive connection, so idle connections close too).
    pub header_read_timeout: Duration,
    /// Each piece of the body must arrive within this of the one before (a body trickled
    /// faster than that is bounded by `body_limit` instead).
    pub body_read_timeout: Duration,
    /// Connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl HttpOptions {
    /// Sensible limits for tests and embedders: the config file's defaults.
    pub fn new(hint_header: &str) -> Self {
        Self {
            hint_header: hint_header.to_owned(),
            body_limit: 1 << 20,
            drain_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Serves `gateway` over HTTP until `shutdown` resolves and open replies drain (or the
/// drain timeout passes), or until `failure` resolves with an error (a model that did not
/// load). Any backend works here, which is how drain is tested on a scripted engine.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    failure: impl Future<Output = anyhow::Error>,
) -> anyhow::Result<()> {
    // Flipped when shutdown begins; `/ready` reads it.
    let (draining_tx, draining) = watch::channel(false);
    let state = AppState::new(StateParts {
        gateway,
        hint_header: options.hint_header.clone(),
        body_limit: options.body_limit,
        draining,
    });
    let body_read_timeout = options.body_read_timeout;
    let app = api::router(state).layer(MapRequestBodyLayer::new(move |body| {
        axum::body::Body::new(BodyTimeout::new(body, body_read_timeout))
    }));
    let address = listener.local_addr()?;
    tracing::info!(%address, "listening");

    // axum::serve runs hyper without a timer, so no header timeout can be set there; this
    // is the same loop with one, a connection cap, and hyper-util's graceful shutdown.
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(options.header_read_timeout);
    let graceful = GracefulShutdown::new();
    // One permit per open connection; the accept loop waits for a free one.
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let accepting = async {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit,
                () = &mut shutdown => return,
            };
            let Ok(permit) = permit else { return };
            let (stream, _peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            // Each streamed chunk is a small write soon after the one before: with Nagle's
            // algorithm it would wait for the client's (possibly delayed) ACK of that one.
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "cannot set TCP_NODELAY");
            }
            let header_read_timeout = options.header_read_timeout;
            let service = TowerToHyperService::new(app.clone());
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                // hyper's header timer starts only once it knows the protocol, which takes
                // a first byte: a client that connects and says nothing is dropped here.
                // (`peek`, not `readable`: readiness may be reported before any data.)
                let mut first = [0u8; 1];
                let spoke =
                    tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await;
                if matches!(spoke, Ok(Ok(1..))) {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(err) = watcher.watch(connection).await {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                }
                drop(permit);
            });
        }
    };
    tokio::select! {
        () = accepting => {}
        failure = failure => return Err(failure),
    }
    // Stop accepting at once, then let every open response finish.
    drop(listener);
    let drain_timeout = options.drain_timeout;
    tracing::info!(
        ?drain_timeout,
        "draining: no new connections, in-flight replies may finish"
    );
    let _ = draining_tx.send(true);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_timeout,
            "drain timeout: ending the replies still open"
        );
    }
    Ok(())
}

/// Long enough for a step in flight to end and the model to be freed.
const MODEL_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops a background task when the server that owns it stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
