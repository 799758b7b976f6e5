//! The OpenAI-compatible HTTP surface.

pub mod chat;
pub mod error;
pub mod types;

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;

use tokio::sync::watch;

use crate::chat::ChatRequest;
use crate::engine::Health;
use crate::gateway::{Admitted, Gateway};
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

    /// The checked chat request in a body; a refusal (400, 413) is counted.
    pub fn parse(&self, body: Result<Bytes, BytesRejection>) -> Result<ChatRequest, ApiError> {
        body.map_err(|r| ApiError::from_body_rejection(r, self.body_limit()))
            .and_then(|body| types::parse_chat_request(&body))
            .inspect_err(|err| self.gateway().count_refused(err.status.as_u16()))
    }

    /// Who is calling: the bearer token (or `x-api-key`) and the routing hint header.
    /// Not yet admitted: see [`Authorized`].
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

/// A caller whose API key and request quota were checked from the headers alone, before
/// the body is read: axum runs this extractor ahead of the one that reads the body.
pub struct Authorized(pub Admitted);

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = state.caller(&parts.headers);
        Ok(Self(state.gateway().admit(caller)?))
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
        .method_not_allowed_fallback(method_not_allowed)
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

/// 200 once every model is loaded and its step loop running. 503 while any loads, after
/// any went down (naming it, its tier and why), and while draining. Remote models list
/// their endpoints' states under `endpoints`; a fleet is down only when none takes requests.
async fn ready(State(state): State<AppState>) -> Response {
    let mut models = serde_json::Map::new();
    let mut down = serde_json::Map::new();
    let mut endpoints = serde_json::Map::new();
    let mut loading = false;
    for backend in state.gateway().tiers().backends() {
        let info = backend.info();
        let health = backend.health();
        models.insert(info.id.clone(), json!(health == Health::Ready));
        let fleet = backend.endpoints();
        if !fleet.is_empty() {
            endpoints.insert(info.id.clone(), json!(fleet));
        }
        match health {
            Health::Ready => {}
            Health::Loading => loading = true,
            Health::Down(reason) => {
                down.insert(
                    info.id.clone(),
                    json!({"tier": info.tier, "reason": reason}),
                );
            }
        }
    }
    let status = if *state.inner.draining.borrow() {
        "draining"
    } else if !down.is_empty() {
        "down"
    } else if loading {
        "loading"
    } else {
        "ready"
    };
    let mut body = json!({"status": status, "models": models});
    if !down.is_empty() {
        body["down"] = serde_json::Value::Object(down);
    }
    if !endpoints.is_empty() {
        body["endpoints"] = serde_json::Value::Object(endpoints);
    }
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
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

async fn not_found(State(state): State<AppState>, uri: Uri) -> ApiError {
    state.gateway().count_refused(404);
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(State(state): State<AppState>, method: Method, uri: Uri) -> ApiError {
    state.gateway().count_refused(405);
    ApiError::method_not_allowed(&method, uri.path())
}
