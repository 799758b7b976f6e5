//! Start-up and serving: spawn one engine per configured model, serve HTTP at once
//! (`/ready` says 503 until every model has loaded), and stop on the caller's signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::engine::llama::LlamaEngine;
use crate::engine::Engine;
use crate::metrics::{Metrics, ModelLabels, OutcomeLabels};
use crate::router::{reload, PolicyStore};

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
    let mut engines: Vec<Arc<dyn Engine>> = Vec::new();
    let mut ready_signals = Vec::new();
    for model in &config.models {
        let gauges = metrics.engine_gauges(&ModelLabels {
            model: model.id.clone(),
            tier: model.tier.clone(),
        });
        let (engine, ready) = LlamaEngine::start(model.clone(), gauges)
            .with_context(|| format!("cannot start the thread for model {}", model.id))?;
        engines.push(engine);
        ready_signals.push((model.id.clone(), ready));
    }

    let state = AppState::new(
        engines,
        policies,
        config.router.hint_header.clone(),
        config.server.body_limit_bytes,
        metrics,
    );
    let app = api::router(state);
    let address = listener.local_addr()?;
    tracing::info!(%address, "listening");

    let serving = axum::serve(listener, app).with_graceful_shutdown(shutdown);
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
    tokio::select! {
        served = serving => served.context("the HTTP server failed"),
        failure = loading => Err(failure),
    }
}

/// Stops a background task when the server that owns it stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
