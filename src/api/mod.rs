//! The OpenAI-compatible HTTP surface.

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

use crate::gateway::Gateway;
use crate::router::Caller;
use error::ApiError;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateParts>,
}

/// What the HTTP layer holds: the gateway it serves, and its own settings.
pub struct StateParts {
    pub gateway: Arc<Gateway>,
    /// The header a client may name a route hint in; empty turns hints off.
    pub hint_header: String,
    pub body_limit: usize,
    /// Turns true when shutdown begins: `/ready` then says 503 so balancers stop sending.
    pub draining: watch::Receiver<bool>,
}

impl AppState {
    pub fn new(parts: StateParts) -> Self {
        Self {
            inner: Arc::new(parts),
        }
    }

    pub fn gateway(&self) -> &Gateway {
        &self.inner.gateway
    }

    pub fn body_limit(&self) -> usize {
        self.inner.body_limit
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
    data.extend(state.gateway().tiers().backends().iter().map(|e| {
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
    let tiers = state.gateway().tiers();
    let models: serde_json::Map<String, serde_json::Value> = tiers
        .backends()
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
    if tiers.all_ready() {
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
        state.gateway().metrics().render(),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}
