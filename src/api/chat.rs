//! `POST /v1/chat/completions` and `POST /v1/route`: parse, hand to the [`Gateway`], render.
//!
//! The response is held until the first engine event is in hand (the gateway returns only
//! then), so that a request that fails before generating gets a real status code, and so
//! that a client timing the first chunk measures the true time to first token.
//!
//! [`Gateway`]: crate::gateway::Gateway

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use futures::{stream, FutureExt as _};

use super::error::ApiError;
use super::types::{
    AssistantMessage, ChunkBody, ChunkChoice, ChunkNote, CompletionBody, CompletionChoice, Delta,
    LogprobsBody, UsageBody,
};
use super::{AppState, Authorized};
use crate::budget::CacheUse;
use crate::engine::logprobs::TokenLogprob;
use crate::engine::{FinishReason, StageTimings, Usage};
use crate::gateway::{Completion, Ending, Reply, ReplyEvent, Served};

pub const TIER_HEADER: HeaderName = HeaderName::from_static("x-tiergate-tier");
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-tiergate-model");
pub const RULE_HEADER: HeaderName = HeaderName::from_static("x-tiergate-rule");
pub const PINNED_HEADER: HeaderName = HeaderName::from_static("x-tiergate-pinned");
/// `<from>-><to>; reason=<why>` when a smaller tier or the cache answered instead.
pub const DEGRADED_HEADER: HeaderName = HeaderName::from_static("x-tiergate-degraded");
/// `miss`, `shared`, `hit`, `semantic` or `stale` for cacheable requests.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-tiergate-cache");
/// On a semantic cache hit: the cosine similarity of the cached question (0 to 1).
pub const CACHE_SIMILARITY_HEADER: HeaderName =
    HeaderName::from_static("x-tiergate-cache-similarity");
/// The remote endpoint (base URL) that answered, when the tier is a fleet.
pub const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-tiergate-endpoint");
/// `total` on a non-streaming reply cut short by its total budget.
pub const BUDGET_CUT_HEADER: HeaderName = HeaderName::from_static("x-tiergate-budget-cut");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

pub async fn chat_completions(
    State(state): State<AppState>,
    Authorized(caller): Authorized,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = state.parse(body)?;
    let stream = request.stream;
    let wants_logprobs = request.logprobs.is_some();
    let served = state.gateway().serve(caller, request).await?;
    let headers = route_headers(&served);
    let meta = ResponseMeta::of(&served);
    let mut response = if stream {
        stream_response(meta, served.reply)
    } else {
        let route_time = served.route_time;
        let completion = served.reply.collect().await?;
        let mut response = complete_response(&meta, &completion, wants_logprobs);
        let timing = server_timing(route_time, &completion.ending.timings, meta.cache);
        response.headers_mut().extend(
            HeaderValue::from_str(&timing)
                .ok()
                .map(|v| (SERVER_TIMING, v)),
        );
        if completion.ending.budget_cut {
            let cut = HeaderValue::from_static("total");
            response.headers_mut().insert(BUDGET_CUT_HEADER, cut);
        }
        response
    };
    response.headers_mut().extend(headers);
    Ok(response)
}

/// `POST /v1/route`: how a chat request would be routed, without generating.
/// Needs the same API key as chat and counts against its request quota.
pub async fn explain_route(
    State(state): State<AppState>,
    Authorized(caller): Authorized,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = state.parse(body)?;
    let explained = state.gateway().explain(caller, &request).await?;
    Ok(Json(explained).into_response())
}

/// `Server-Timing` of a non-streaming reply: routing, then the engine's queue, prefill and
/// decode stages in milliseconds (browsers' dev tools and many proxies show these). A
/// reply from the cache names its cache use instead of engine stages.
fn server_timing(route: Duration, stages: &StageTimings, cache: Option<CacheUse>) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut parts = vec![format!("route;dur={:.3}", ms(route))];
    match cache {
        Some(replayed) if replayed.replayed() => {
            parts.push(format!("cache;desc={}", replayed.as_str()));
        }
        _ => {
            parts.push(format!("queue;dur={:.3}", ms(stages.queue)));
            parts.push(format!("prefill;dur={:.3}", ms(stages.prefill)));
            parts.push(format!("decode;dur={:.3}", ms(stages.decode)));
        }
    }
    parts.join(", ")
}

/// Every response says which tier and model served it, which rule chose the route,
/// and whether it was degraded or came from the cache.
fn route_headers(served: &Served) -> HeaderMap {
    let degraded = served.degraded.as_ref().map(ToString::to_string);
    let similarity = served.similarity.map(|s| format!("{s:.4}"));
    let pairs = [
        (TIER_HEADER, Some(served.tier.as_str())),
        (MODEL_HEADER, Some(served.model.as_str())),
        (RULE_HEADER, Some(served.route.rule.as_str())),
        (PINNED_HEADER, served.route.pinned.then_some("true")),
        (DEGRADED_HEADER, degraded.as_deref()),
        (CACHE_HEADER, served.cache.map(CacheUse::as_str)),
        (CACHE_SIMILARITY_HEADER, similarity.as_deref()),
        (ENDPOINT_HEADER, served.endpoint.as_deref()),
    ];
    pairs
        .into_iter()
        .filter_map(|(name, value)| Some((name, HeaderValue::from_str(value?).ok()?)))
        .collect()
}

/// Identity shared by every chunk of one response.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    total_budget_ms: u64,
    cache: Option<CacheUse>,
}

impl ResponseMeta {
    fn of(served: &Served) -> Self {
        Self {
            id: served.id.clone(),
            created: served.created,
            model: served.model.clone(),
            include_usage: served.include_usage,
            total_budget_ms: served.route.total_ms,
            cache: served.cache,
        }
    }

    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<FinishReason>) -> Bytes {
        self.choice_chunk(delta, None, finish_reason, None)
    }

    /// The last content chunk of a reply the total budget cut short: `finish_reason`
    /// is `length`, and a `tiergate` field says why (headers are long gone by then).
    fn budget_cut_chunk(&self) -> Bytes {
        let note = ChunkNote {
            budget_cut: "total",
            total_ms: self.total_budget_ms,
        };
        self.choice_chunk(
            Delta::default(),
            None,
            Some(FinishReason::Length),
            Some(note),
        )
    }

    fn choice_chunk(
        &self,
        delta: Delta<'_>,
        logprobs: Option<&[TokenLogprob]>,
        finish_reason: Option<FinishReason>,
        tiergate: Option<ChunkNote>,
    ) -> Bytes {
        self.encode(&ChunkBody {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: logprobs.map(|content| LogprobsBody { content }),
                finish_reason: finish_reason.map(FinishReason::as_str),
            }],
            usage: self.include_usage.then_some(None),
            tiergate,
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
            tiergate: None,
        })
    }

    fn encode(&self, chunk: &ChunkBody<'_>) -> Bytes {
        // Serializing these plain structs cannot fail; an empty object keeps the stream well-formed if it did.
        let json = serde_json::to_string(chunk).unwrap_or_else(|_| "{}".into());
        Bytes::from(format!("data: {json}\n\n"))
    }

    /// The end of a stream: the finishing chunk, the usage chunk if asked, `[DONE]`.
    fn ending(&self, ending: &Ending) -> Bytes {
        let last = if ending.budget_cut {
            self.budget_cut_chunk()
        } else {
            self.chunk(Delta::default(), Some(ending.finish_reason))
        };
        let mut out = last.to_vec();
        if self.include_usage {
            out.extend_from_slice(&self.usage_chunk(ending.usage));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }

    /// The bytes for one reply event.
    fn event(&self, event: ReplyEvent) -> Bytes {
        match event {
            ReplyEvent::Text(text) => self.chunk(
                Delta {
                    content: Some(&text),
                    ..Delta::default()
                },
                None,
            ),
            ReplyEvent::ToolCalls(calls) => self.chunk(
                Delta {
                    tool_calls: Some(&calls),
                    ..Delta::default()
                },
                None,
            ),
            ReplyEvent::Scored { text, logprobs } => self.choice_chunk(
                Delta {
                    content: Some(&text),
                    ..Delta::default()
                },
                Some(&logprobs),
                None,
                None,
            ),
            ReplyEvent::Finished(ending) => self.ending(&ending),
            ReplyEvent::Failed(err) => ApiError::from(err).sse_event(),
        }
    }
}

fn complete_response(meta: &ResponseMeta, completion: &Completion, logprobs: bool) -> Response {
    // Asked for and none to give (an empty reply, an upstream that sent none): an empty list.
    let content = completion.logprobs.as_deref().unwrap_or_default();
    let body = CompletionBody {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices: [CompletionChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: if completion.text.is_empty() && !completion.tool_calls.is_empty() {
                    None
                } else {
                    Some(&completion.text)
                },
                tool_calls: &completion.tool_calls,
            },
            logprobs: logprobs.then_some(LogprobsBody { content }),
            finish_reason: completion.ending.finish_reason.as_str(),
        }],
        usage: completion.ending.usage.into(),
    };
    match serde_json::to_string(&body) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::internal(format!("could not encode the response: {e}")).into_response(),
    }
}

/// Most bytes of ready events written together, so that a long replayed reply starts
/// going out before all of it is rendered.
const COALESCE_BYTES: usize = 32 * 1024;

fn stream_response(meta: ResponseMeta, reply: Reply) -> Response {
    // The role chunk goes out with the first event, so the first chunk a client sees is
    // the first token's.
    let role = meta.chunk(
        Delta {
            role: Some("assistant"),
            content: Some(""),
            tool_calls: None,
        },
        None,
    );
    // Dropping this stream (client gone) drops the reply and its source, which the step
    // loop sees as a closed channel: the sequence leaves and its KV cells are freed.
    let body = stream::unfold(
        (meta, reply, Some(role)),
        |(meta, mut reply, role)| async move {
            let event = reply.next().await?;
            let mut bytes = BytesMut::new();
            if let Some(role) = role {
                bytes.extend_from_slice(&role);
            }
            bytes.extend_from_slice(&meta.event(event));
            // Events already at hand go out in the same write, up to a bound: a reply
            // replayed from the cache is a few writes, not one per token (`next` is
            // cancel-safe: an event not yet there stays for the next poll).
            while bytes.len() < COALESCE_BYTES {
                let Some(Some(event)) = reply.next().now_or_never() else {
                    break;
                };
                bytes.extend_from_slice(&meta.event(event));
            }
            Some((Ok::<Bytes, Infallible>(bytes.freeze()), (meta, reply, None)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Tell nginx-style proxies not to buffer the stream.
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}
