//! One error type for the HTTP layer, one mapping: each error knows its status, its
//! OpenAI `type` and `code`. Before a stream starts it is a JSON body; after, an SSE
//! `error` event that ends the stream.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use crate::admission::Denied;
use crate::budget::BudgetError;
use crate::engine::EngineError;
use crate::gateway::{engine_status, GatewayError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// Seconds for a `Retry-After` header on 429/503.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400 `invalid_request_error`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 for an OpenAI parameter tiergate does not implement: never silently ignored.
    pub fn unsupported_parameter(param: &str, why: &str) -> Self {
        Self::invalid_request(format!("`{param}` is not supported: {why}"))
            .with_code("unsupported_parameter")
            .with_param(param)
    }

    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{model}` does not exist; available: {}",
                available.join(", ")
            ),
        )
        .with_code("model_not_found")
        .with_param("model")
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route for {path}"),
        )
        .with_code("unknown_url")
    }

    pub fn method_not_allowed(method: &axum::http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
        )
        .with_code("method_not_allowed")
    }

    /// 401 for a missing or unknown API key (OpenAI's shape and code).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    /// 429: a quota is spent; `kind` is OpenAI's `requests` or `tokens`.
    pub fn rate_limited(kind: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, kind, message)
            .with_code("rate_limit_exceeded")
            .with_retry_after(retry_after)
    }

    /// 503: no tier can answer within the request's budget right now.
    pub fn overloaded(message: impl Into<String>, retry_after: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .with_code("overloaded")
            .with_retry_after(retry_after)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn from_body_rejection(rejection: BytesRejection, limit: usize) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                status,
                "invalid_request_error",
                format!("the request body is larger than the limit of {limit} bytes"),
            )
            .with_code("request_too_large")
        } else {
            Self::new(status, "invalid_request_error", rejection.body_text())
        }
    }

    fn json(&self) -> String {
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from(r#"{"error":{}}"#))
    }

    /// The same error as an SSE event, for failures after the stream has started.
    pub fn sse_event(&self) -> Bytes {
        Bytes::from(format!("event: error\ndata: {}\n\n", self.json()))
    }
}

/// Whole seconds for `Retry-After`, rounded up and at least 1 (0 would invite a retry storm).
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::MissingKey => Self::unauthorized(
                "no API key: send it as `Authorization: Bearer <key>` (or `x-api-key`)",
            ),
            Denied::UnknownKey => Self::unauthorized("the API key is not valid"),
            Denied::RequestRate { retry_after } => Self::rate_limited(
                "requests",
                "rate limit reached for requests per minute on this API key",
                retry_after_secs(retry_after),
            ),
            Denied::TokenRate { retry_after } => Self::rate_limited(
                "tokens",
                "rate limit reached for tokens per minute on this API key",
                retry_after_secs(retry_after),
            ),
            Denied::OverTokenQuota { tokens, per_minute } => Self::rate_limited(
                "tokens",
                format!(
                    "the request needs {tokens} tokens (prompt plus max_tokens), more than this \
                     API key's whole quota of {per_minute} per minute; lower max_tokens"
                ),
                60,
            ),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let message = err.to_string();
        let status =
            StatusCode::from_u16(engine_status(&err)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let error = if status.is_client_error() {
            Self::invalid_request(message)
        } else {
            Self::new(status, "server_error", message)
        };
        match err {
            EngineError::Loading { .. } => error.with_code("model_loading").with_retry_after(1),
            EngineError::Unavailable { .. } => error.with_code("model_unavailable"),
            EngineError::QueueFull { .. } => error.with_code("overloaded").with_retry_after(1),
            EngineError::PromptTooLong { .. } => error
                .with_code("context_length_exceeded")
                .with_param("messages"),
            EngineError::ContextLengthExceeded { .. } => error
                .with_code("context_length_exceeded")
                .with_param("max_tokens"),
            EngineError::Template(_) => error.with_param("messages"),
            EngineError::InvalidParameter { param, .. } => error.with_param(param),
            EngineError::UpstreamRejected { .. } => error.with_code("upstream_rejected"),
            EngineError::Decode(_) => error,
            EngineError::Upstream(_) => error.with_code("upstream_error"),
        }
    }
}

impl From<GatewayError> for ApiError {
    fn from(err: GatewayError) -> Self {
        let message = err.to_string();
        match err {
            GatewayError::Denied(denied) => denied.into(),
            GatewayError::UnknownModel(unknown) => {
                Self::model_not_found(&unknown.requested, &unknown.available)
            }
            GatewayError::Budget(BudgetError::Engine(err)) => err.into(),
            GatewayError::Budget(BudgetError::Exhausted { retry_after, .. }) => {
                Self::overloaded(message, retry_after_secs(retry_after))
            }
            GatewayError::TooLarge(_) => Self::invalid_request(message)
                .with_code("context_length_exceeded")
                .with_param("messages"),
            GatewayError::NoBackend(_) => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.json()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
