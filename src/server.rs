//! Start-up and serving: spawn one engine per configured model, serve HTTP at once
//! (`/ready` says 503 until every model has loaded), and stop on the caller's signal.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::api::{self, AppState, StateParts};
use crate::cache::{CacheCounters, ReplyCache};
use crate::config::Config;
use crate::engine::llama::LlamaEngine;
use crate::engine::Engine;
use crate::gateway::{Gateway, GatewayParts};
use crate::metrics::{Metrics, ModelLabels, OutcomeLabels};
use crate::router::{reload, PolicyStore};
use crate::tiers::Tiers;

/// Serves until `shutdown` resolves. Returns an error if any model fails to load, so that
/// a broken model stops the process instead of leaving it half-ready.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    // A policy with problems stops start-up with all of them listed.
    let policies = Arc::new(
        PolicyStore::load(config.router.policies.clone(), config.tiers())
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
    for model in &config.models {
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

    let cache = Arc::new(ReplyCache::new(
        config.cache.max_entries,
        config.cache.max_bytes,
        CacheCounters {
            evictions: metrics.cache_evictions.clone(),
        },
    ));
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
    outcome
}

/// The HTTP layer's own settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub hint_header: String,
    pub body_limit: usize,
    /// On shutdown, how long open replies may take to finish.
    pub drain_timeout: Duration,
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
    // Flipped when shutdown begins; `/ready` reads it, the drain timer waits on it.
    let (draining_tx, draining) = watch::channel(false);
    let state = AppState::new(StateParts {
        gateway,
        hint_header: options.hint_header,
        body_limit: options.body_limit,
        draining: draining.clone(),
    });
    let app = api::router(state);
    let address = listener.local_addr()?;
    tracing::info!(%address, "listening");

    let drain_timeout = options.drain_timeout;
    let begin_drain = async move {
        shutdown.await;
        tracing::info!(
            ?drain_timeout,
            "draining: no new connections, in-flight replies may finish"
        );
        let _ = draining_tx.send(true);
    };
    // Stops accepting at once, then waits for every open response to finish.
    let serving = axum::serve(listener, app).with_graceful_shutdown(begin_drain);
    let drain_deadline = async move {
        let mut draining = draining;
        let _ = draining.wait_for(|d| *d).await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        served = serving => served.context("the HTTP server failed"),
        failure = failure => Err(failure),
        () = drain_deadline => {
            tracing::warn!(?drain_timeout, "drain timeout: ending the replies still open");
            Ok(())
        }
    }
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
