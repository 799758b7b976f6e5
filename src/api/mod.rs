//! The OpenAI-compatible HTTP surface.

pub mod budget;
pub mod chat;
pub mod error;
pub mod types;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use tokio::sync::watch;

use crate::admission::{Admission, Client, Denied};
use crate::cache::ReplyCache;
use crate::engine::{ChatMessage, Engine};
use crate::metrics::{Metrics, ModelLabels, ReasonLabels, RequestLabels, RouteLabels};
use crate::router::{Caller, Policy, PolicyStore, Route, Tokenizers};
use error::ApiError;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateParts>,
}

/// Everything [`AppState`] shares between handlers.
pub struct StateParts {
    /// In config order, which is also the degrade order: a tier degrades to the tier
    /// listed before it.
    pub engines: Vec<Arc<dyn Engine>>,
    pub policies: Arc<PolicyStore>,
    pub admission: Admission,
    pub cache: Arc<ReplyCache>,
    pub hint_header: String,
    pub body_limit: usize,
    pub metrics: Arc<Metrics>,
    /// Turns true when shutdown begins: `/ready` then says 503 so balancers stop sending.
    pub draining: watch::Receiver<bool>,
}

impl AppState {
    pub fn new(parts: StateParts) -> Self {
        Self {
            inner: Arc::new(parts),
        }
    }

    pub fn cache(&self) -> &Arc<ReplyCache> {
        &self.inner.cache
    }

    /// Checks the caller's key and spends one request of its quota; refusals are counted.
    pub fn admit(&self, caller: &Caller) -> Result<Option<Client>, ApiError> {
        self.inner
            .admission
            .admit(caller.api_key.as_deref())
            .map_err(|denied| self.refuse(denied))
    }

    /// Spends a request's tokens from its key's per-minute token quota.
    pub fn spend_tokens(&self, client: &Client, tokens: u32) -> Result<(), ApiError> {
        self.inner
            .admission
            .spend_tokens(client, tokens)
            .map_err(|denied| self.refuse(denied))
    }

    fn refuse(&self, denied: Denied) -> ApiError {
        self.metrics()
            .rate_limited
            .get_or_create(&ReasonLabels {
                reason: denied.reason().to_owned(),
            })
            .inc();
        denied.into()
    }

    /// `tier` first, then each smaller tier (those listed before it), nearest first.
    pub fn degrade_path(&self, tier: &str) -> Vec<String> {
        let mut tiers: Vec<&str> = Vec::new();
        for engine in &self.inner.engines {
            let name = engine.info().tier.as_str();
            if name == tier {
                break;
            }
            if !tiers.contains(&name) {
                tiers.push(name);
            }
        }
        std::iter::once(tier)
            .chain(tiers.into_iter().rev())
            .map(str::to_owned)
            .collect()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn body_limit(&self) -> usize {
        self.inner.body_limit
    }

    /// The policy in force now; a request keeps it to the end even if a reload happens.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policies.current()
    }

    /// The tier a request's `model` names: `None` for `auto` (the policy decides), the
    /// model's tier for a model id, or the tier itself. Anything else is 404.
    pub fn requested_tier(&self, requested: &str) -> Result<Option<String>, ApiError> {
        if requested == "auto" {
            return Ok(None);
        }
        let engines = &self.inner.engines;
        engines
            .iter()
            .find(|e| e.info().id == requested)
            .or_else(|| engines.iter().find(|e| e.info().tier == requested))
            .map(|e| Some(e.info().tier.clone()))
            .ok_or_else(|| ApiError::model_not_found(requested, &self.model_names()))
    }

    /// The engine serving `tier` (policies are validated against configured tiers).
    pub fn engine_for_tier(&self, tier: &str) -> Result<Arc<dyn Engine>, ApiError> {
        self.inner
            .engines
            .iter()
            .find(|e| e.info().tier == tier)
            .cloned()
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "the policy chose tier `{tier}`, which no model serves"
                ))
            })
    }

    /// Who is calling: the bearer token (or `x-api-key`) and the routing hint header.
    pub fn caller(&self, headers: &HeaderMap) -> Caller {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let api_key = text("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| text("x-api-key"))
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty());
        let hint = (!self.inner.hint_header.is_empty())
            .then(|| text(&self.inner.hint_header))
            .flatten()
            .map(|h| h.trim().to_ascii_lowercase());
        Caller {
            api_key,
            tenant: None,
            hint,
        }
    }

    pub fn count_route(&self, route: &Route) {
        self.metrics()
            .route_decisions
            .get_or_create(&RouteLabels {
                tier: route.tier.clone(),
                rule: route.rule.clone(),
            })
            .inc();
    }

    fn model_names(&self) -> Vec<String> {
        let mut names = vec!["auto".to_owned()];
        for engine in &self.inner.engines {
            let info = engine.info();
            for name in [&info.tier, &info.id] {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// One request's outcome: `status` is the HTTP status (or `stream_error`,
    /// `client_closed`), `finish_reason` as in [`RequestLabels`].
    pub fn count_request(&self, labels: &ModelLabels, status: &str, finish_reason: &str) {
        self.metrics()
            .requests
            .get_or_create(&RequestLabels {
                model: labels.model.clone(),
                tier: labels.tier.clone(),
                status: status.to_owned(),
                finish_reason: finish_reason.to_owned(),
            })
            .inc();
    }

    pub fn all_ready(&self) -> bool {
        self.inner.engines.iter().all(|e| e.is_ready())
    }
}

/// The router counts prompt tokens on each tier's own vocabulary, exactly as its engine will
/// prefill them (`Prompter::count`: the Rust tokenizer once it has matched llama.cpp).
impl Tokenizers for AppState {
    fn count(&self, tier: &str, messages: &[ChatMessage]) -> Result<u32, String> {
        let engine = self.engine_for_tier(tier).map_err(|e| e.message)?;
        engine
            .count_prompt_tokens(messages)
            .map_err(|e| e.to_string())
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.body_limit();
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/route", post(chat::explain_route))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let mut data =
        vec![json!({"id": "auto", "object": "model", "created": 0, "owned_by": "tiergate"})];
    data.extend(state.inner.engines.iter().map(|e| {
        let info = e.info();
        json!({
            "id": info.id,
            "object": "model",
            "created": 0,
            "owned_by": "tiergate",
            "tier": info.tier,
            "ready": e.is_ready(),
        })
    }));
    Json(json!({"object": "list", "data": data}))
}

/// The process is alive and serving HTTP (models may still be loading).
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Every model is loaded and its step loop running.
async fn ready(State(state): State<AppState>) -> Response {
    let models: serde_json::Map<String, serde_json::Value> = state
        .inner
        .engines
        .iter()
        .map(|e| (e.info().id.clone(), json!(e.is_ready())))
        .collect();
    if *state.inner.draining.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "models": models})),
        )
            .into_response();
    }
    if state.all_ready() {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "models": models})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "models": models})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics().render(),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}
