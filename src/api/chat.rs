//! `POST /v1/chat/completions`: streaming (SSE) and non-streaming.
//!
//! The response is held until the first engine event is in hand, so that a request that
//! fails before generating gets a real status code, and so that a client timing the first
//! chunk measures the true time to first token.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::stream;

use super::error::ApiError;
use super::types::{
    AssistantMessage, ChatRequest, ChunkBody, ChunkChoice, CompletionBody, CompletionChoice, Delta,
    UsageBody,
};
use super::AppState;
use crate::engine::{EngineError, FinishReason, TokenEvent, TokenStream, Usage};
use crate::metrics::ModelLabels;
use crate::router::{Features, RequestTokens, Route};

pub const TIER_HEADER: HeaderName = HeaderName::from_static("x-tiergate-tier");
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-tiergate-model");
pub const RULE_HEADER: HeaderName = HeaderName::from_static("x-tiergate-rule");
pub const PINNED_HEADER: HeaderName = HeaderName::from_static("x-tiergate-pinned");

/// Identity shared by every chunk of one response.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.body_limit()))?;
    let mut request = ChatRequest::from_json(&body)?;
    let pin = state.requested_tier(&request.model)?;
    let features = Features::extract(
        &request.generation.messages,
        request.generation.max_tokens,
        state.caller(&headers),
    );
    let route = state.policy().route(
        &features,
        &RequestTokens {
            tokenizers: &state,
            messages: &request.generation.messages,
        },
        pin.as_deref(),
    );
    state.count_route(&route);
    let engine = state.engine_for_tier(&route.tier)?;
    if let Some(cap) = route.max_tokens {
        let generation = &mut request.generation;
        generation.max_tokens = generation.max_tokens.map(|n| n.min(cap));
        generation.max_tokens_cap = Some(cap);
    }

    let info = engine.info();
    let labels = ModelLabels {
        model: info.id.clone(),
        tier: info.tier.clone(),
    };
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: info.id.clone(),
        include_usage: request.include_usage,
    };

    let accepted_at = Instant::now();
    let mut tokens = engine
        .submit(request.generation)
        .inspect_err(|e| state.count_request(&labels, status_of(e)))?;
    let first = tokens.next_event().await.unwrap_or_else(engine_gone);
    if let TokenEvent::Failed(err) = first {
        state.count_request(&labels, status_of(&err));
        return Err(err.into());
    }
    let metrics = state.metrics();
    metrics
        .time_to_first_token
        .get_or_create(&labels)
        .observe(accepted_at.elapsed().as_secs_f64());
    metrics
        .prompt_tokens
        .get_or_create(&labels)
        .inc_by(u64::from(tokens.prompt_tokens));

    let response = if request.stream {
        stream_response(meta, first, tokens, state.clone(), labels)
    } else {
        match collect(first, &mut tokens).await {
            Ok(completion) => {
                record_finished(&state, &labels, completion.usage);
                complete_response(&meta, completion)
            }
            Err(err) => {
                state.count_request(&labels, status_of(&err));
                return Err(err.into());
            }
        }
    };
    Ok(with_route_headers(response, &route, &engine.info().id))
}

/// `POST /v1/route`: how a chat request would be routed, without generating.
pub async fn explain_route(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.body_limit()))?;
    let request = ChatRequest::from_json(&body)?;
    let pin = state.requested_tier(&request.model)?;
    let messages = &request.generation.messages;
    let features = Features::extract(
        messages,
        request.generation.max_tokens,
        state.caller(&headers),
    );
    let explanation = state.policy().explain(
        &features,
        &RequestTokens {
            tokenizers: &state,
            messages,
        },
        pin.as_deref(),
    );
    let engine = state.engine_for_tier(&explanation.route.tier)?;
    let mut body = serde_json::to_value(&explanation)
        .map_err(|e| ApiError::internal(format!("could not encode the explanation: {e}")))?;
    body["model"] = serde_json::Value::from(engine.info().id.clone());
    Ok(Json(body).into_response())
}

fn engine_gone() -> TokenEvent {
    TokenEvent::Failed(EngineError::Decode(
        "the model thread ended the sequence without finishing it".into(),
    ))
}

fn status_of(err: &EngineError) -> StatusCode {
    ApiError::from(err.clone()).status
}

/// Counts a request that generated to the end.
fn record_finished(state: &AppState, labels: &ModelLabels, usage: Usage) {
    state.count_request(labels, StatusCode::OK);
    state
        .metrics()
        .generated_tokens
        .get_or_create(labels)
        .inc_by(u64::from(usage.completion_tokens));
}

/// Every response says which tier and model served it and which rule chose them.
fn with_route_headers(mut response: Response, route: &Route, model: &str) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (TIER_HEADER, route.tier.as_str()),
        (MODEL_HEADER, model),
        (RULE_HEADER, route.rule.as_str()),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    if route.pinned {
        headers.insert(PINNED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// A whole non-streaming generation.
struct Completion {
    text: String,
    finish_reason: FinishReason,
    usage: Usage,
}

async fn collect(first: TokenEvent, tokens: &mut TokenStream) -> Result<Completion, EngineError> {
    let mut text = String::new();
    let mut event = first;
    loop {
        match event {
            TokenEvent::Text(piece) => text.push_str(&piece),
            TokenEvent::Finished {
                finish_reason,
                usage,
            } => {
                return Ok(Completion {
                    text,
                    finish_reason,
                    usage,
                })
            }
            TokenEvent::Failed(err) => return Err(err),
        }
        event = tokens.next_event().await.unwrap_or_else(engine_gone);
    }
}

fn complete_response(meta: &ResponseMeta, completion: Completion) -> Response {
    let Completion {
        text,
        finish_reason,
        usage,
    } = completion;
    let body = CompletionBody {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices: [CompletionChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: &text,
            },
            logprobs: None,
            finish_reason: finish_reason.as_str(),
        }],
        usage: usage.into(),
    };
    match serde_json::to_string(&body) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::internal(format!("could not encode the response: {e}")).into_response(),
    }
}

impl ResponseMeta {
    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<FinishReason>) -> Bytes {
        self.encode(&ChunkBody {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish_reason.map(FinishReason::as_str),
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    /// The extra chunk `stream_options.include_usage` asks for: empty choices, usage set.
    fn usage_chunk(&self, usage: Usage) -> Bytes {
        self.encode(&ChunkBody {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: Vec::new(),
            usage: Some(Some(UsageBody::from(usage))),
        })
    }

    fn encode(&self, chunk: &ChunkBody<'_>) -> Bytes {
        // Serializing these plain structs cannot fail; an empty object keeps the stream well-formed if it did.
        let json = serde_json::to_string(chunk).unwrap_or_else(|_| "{}".into());
        Bytes::from(format!("data: {json}\n\n"))
    }
}

/// Where the SSE body is in its life.
enum Phase {
    /// The first event is in hand; the role chunk goes out with it.
    First(TokenEvent),
    Streaming,
    Done,
}

struct SseState {
    meta: Arc<ResponseMeta>,
    tokens: TokenStream,
    phase: Phase,
    state: AppState,
    labels: ModelLabels,
}

impl SseState {
    /// Bytes for one engine event; the phase moves to Done after the last one.
    fn render(&mut self, event: TokenEvent) -> Bytes {
        let meta = &self.meta;
        match event {
            TokenEvent::Text(text) => meta.chunk(
                Delta {
                    role: None,
                    content: Some(&text),
                },
                None,
            ),
            TokenEvent::Finished {
                finish_reason,
                usage,
            } => {
                self.phase = Phase::Done;
                record_finished(&self.state, &self.labels, usage);
                let mut out = meta.chunk(Delta::default(), Some(finish_reason)).to_vec();
                if meta.include_usage {
                    out.extend_from_slice(&meta.usage_chunk(usage));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            TokenEvent::Failed(err) => {
                self.phase = Phase::Done;
                tracing::warn!(id = %meta.id, %err, "generation failed after the stream started");
                self.state
                    .count_request_outcome(&self.labels, "stream_error");
                ApiError::from(err).sse_event()
            }
        }
    }
}

fn stream_response(
    meta: ResponseMeta,
    first: TokenEvent,
    tokens: TokenStream,
    state: AppState,
    labels: ModelLabels,
) -> Response {
    let initial = SseState {
        meta: Arc::new(meta),
        tokens,
        phase: Phase::First(first),
        state,
        labels,
    };
    // Dropping this stream (client gone) drops the TokenStream, which the step loop sees
    // as a closed channel: the sequence leaves and its KV cells are freed.
    let body = stream::unfold(initial, |mut sse| async move {
        let bytes = match std::mem::replace(&mut sse.phase, Phase::Streaming) {
            Phase::Done => return None,
            Phase::First(event) => {
                let role = sse.meta.chunk(
                    Delta {
                        role: Some("assistant"),
                        content: Some(""),
                    },
                    None,
                );
                let rest = sse.render(event);
                let mut both = role.to_vec();
                both.extend_from_slice(&rest);
                Bytes::from(both)
            }
            Phase::Streaming => {
                let event = sse.tokens.next_event().await.unwrap_or_else(engine_gone);
                sse.render(event)
            }
        };
        Some((Ok::<Bytes, Infallible>(bytes), sse))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Tell nginx-style proxies not to buffer the stream.
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}
