//! `POST /v1/chat/completions`: streaming (SSE) and non-streaming.
//!
//! The response is held until the first engine event is in hand, so that a request that
//! fails before generating gets a real status code, and so that a client timing the first
//! chunk measures the true time to first token.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::stream;
use prometheus_client::metrics::histogram::Histogram;
use tracing::field::Empty;
use tracing::Instrument as _;

use super::budget::{Acquired, Attempt, CacheUse, Deadlines, Degradation, Source};
use super::error::ApiError;
use super::types::{
    AssistantMessage, ChatRequest, ChunkBody, ChunkChoice, ChunkNote, CompletionBody,
    CompletionChoice, Delta, UsageBody,
};
use super::AppState;
use crate::engine::{EngineError, FinishReason, StageTimings, TokenEvent, Usage};
use crate::metrics::{ModelLabels, TierLabels};
use crate::router::{Features, RequestTokens, Route, TokenCounter};

pub const TIER_HEADER: HeaderName = HeaderName::from_static("x-tiergate-tier");
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-tiergate-model");
pub const RULE_HEADER: HeaderName = HeaderName::from_static("x-tiergate-rule");
pub const PINNED_HEADER: HeaderName = HeaderName::from_static("x-tiergate-pinned");
/// `<from>-><to>; reason=<why>` when a smaller tier or the cache answered instead.
pub const DEGRADED_HEADER: HeaderName = HeaderName::from_static("x-tiergate-degraded");
/// `miss`, `shared`, `hit` or `stale` for cacheable requests.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-tiergate-cache");
/// `total` on a non-streaming reply cut short by its total budget.
pub const BUDGET_CUT_HEADER: HeaderName = HeaderName::from_static("x-tiergate-budget-cut");

/// Identity shared by every chunk of one response.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    total_budget_ms: u64,
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // One span per request; the route span and the engine's queue, prefill and decode
    // spans are its children. It closes when the reply's last byte is out.
    let span = tracing::info_span!(
        "request",
        id = Empty,
        rule = Empty,
        tier = Empty,
        model = Empty,
        degraded = Empty,
        cache = Empty,
        prompt_tokens = Empty,
        completion_tokens = Empty,
        finish_reason = Empty,
        ttft_ms = Empty,
    );
    handle_chat(state, headers, body, span.clone())
        .instrument(span)
        .await
}

async fn handle_chat(
    state: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    let mut caller = state.caller(&headers);
    // Keys and request quotas first: an unknown caller costs no parsing or tokenizing.
    let client = state.admit(&caller)?;
    caller.tenant = client.as_ref().and_then(|c| c.tenant.clone());
    let api_key = caller.api_key.clone();
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.body_limit()))?;
    let mut request = ChatRequest::from_json(&body)?;
    let pin = state.requested_tier(&request.model)?;
    let accepted_at = Instant::now();
    let tokens = RequestTokens::new(&state, &request.generation.messages);
    let route = tracing::debug_span!("route").in_scope(|| {
        let features = Features::extract(
            &request.generation.messages,
            request.generation.max_tokens,
            caller,
        );
        let route = state.policy().route(&features, &tokens, pin.as_deref());
        tracing::debug!(rule = %route.rule, tier = %route.tier, pinned = route.pinned, "routed");
        route
    });
    let route_time = accepted_at.elapsed();
    span.record("rule", route.rule.as_str());
    state.count_route(&route);
    request.generation.span = span.clone();
    if let Some(cap) = route.max_tokens {
        request.generation.max_tokens = request.generation.max_tokens.map(|n| n.min(cap));
        request.generation.max_tokens_cap = Some(cap);
    }
    let generation = &request.generation;
    let routed = state.engine_for_tier(&route.tier)?;
    let routed_labels = ModelLabels {
        model: routed.info().id.clone(),
        tier: route.tier.clone(),
    };
    if let Some(client) = &client {
        // The most this request can use: its prompt plus the completion it may generate
        // (a request without max_tokens or a policy cap is charged its prompt only).
        let prompt = tokens.prompt_tokens(&route.tier).unwrap_or(0);
        let completion = generation.max_tokens.or(route.max_tokens).unwrap_or(0);
        state.spend_tokens(client, prompt.saturating_add(completion))?;
    }

    let deadlines = Deadlines::new(accepted_at, &route);
    let acquired = Attempt {
        state: &state,
        generation,
        route: &route,
        tokens: &tokens,
        api_key: api_key.as_deref(),
        deadlines,
    }
    .acquire()
    .await
    .inspect_err(|e| state.count_request(&routed_labels, e.status.as_str(), "none"))?;

    let labels = ModelLabels {
        model: acquired.model.clone(),
        tier: acquired.tier.clone(),
    };
    let generated_here = acquired.cache.is_none_or(CacheUse::generated);
    let metrics = state.metrics();
    let ttft = accepted_at.elapsed();
    metrics
        .time_to_first_token
        .get_or_create(&labels)
        .observe(ttft.as_secs_f64());
    span.record("tier", acquired.tier.as_str());
    span.record("model", acquired.model.as_str());
    span.record("prompt_tokens", acquired.prompt_tokens);
    span.record("ttft_ms", ttft.as_millis() as u64);
    if let Some(degraded) = &acquired.degraded {
        span.record("degraded", degraded.to_string());
    }
    if let Some(cache) = acquired.cache {
        span.record("cache", cache.as_str());
    }
    if generated_here {
        metrics
            .prompt_tokens
            .get_or_create(&labels)
            .inc_by(u64::from(acquired.prompt_tokens));
    }
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    span.record("id", id.as_str());
    let meta = ResponseMeta {
        id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: acquired.model.clone(),
        include_usage: request.include_usage,
        total_budget_ms: route.total_ms,
    };
    let served = ServedBy {
        tier: acquired.tier.clone(),
        model: acquired.model.clone(),
        degraded: acquired.degraded.clone(),
        cache: acquired.cache,
    };
    // Gaps between pieces mean something only for text generated for this reply.
    let inter_token =
        generated_here.then(|| metrics.inter_token_latency.get_or_create(&labels).clone());
    let accounting = Accounting {
        state: state.clone(),
        labels,
        generated_here,
        accepted_at,
        span: span.clone(),
    };

    let response = if request.stream {
        stream_response(meta, acquired, deadlines.total, accounting, inter_token)
    } else {
        let mut reply = Reply::new(acquired, inter_token);
        match reply.collect(deadlines.total).await {
            Ok(completion) => {
                accounting.finished(&completion);
                let mut response = complete_response(&meta, &completion);
                let headers = response.headers_mut();
                if completion.budget_cut {
                    headers.insert(BUDGET_CUT_HEADER, HeaderValue::from_static("total"));
                }
                let timing = server_timing(route_time, &completion.timings, served.cache);
                if let Ok(value) = HeaderValue::from_str(&timing) {
                    headers.insert(SERVER_TIMING, value);
                }
                response
            }
            Err(err) => {
                let status = status_of(&err);
                state.count_request(&accounting.labels, status.as_str(), "error");
                return Err(err.into());
            }
        }
    };
    Ok(with_route_headers(response, &route, &served))
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
        &RequestTokens::new(&state, messages),
        pin.as_deref(),
    );
    let engine = state.engine_for_tier(&explanation.route.tier)?;
    let mut body = serde_json::to_value(&explanation)
        .map_err(|e| ApiError::internal(format!("could not encode the explanation: {e}")))?;
    body["model"] = serde_json::Value::from(engine.info().id.clone());
    Ok(Json(body).into_response())
}

const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// `Server-Timing` of a non-streaming reply: routing, then the engine's queue, prefill and
/// decode stages in milliseconds (browsers' dev tools and many proxies show these). A
/// reply from the cache names its cache use instead of engine stages.
fn server_timing(route: Duration, stages: &StageTimings, cache: Option<CacheUse>) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut parts = vec![format!("route;dur={:.3}", ms(route))];
    match cache {
        Some(replayed @ (CacheUse::Hit | CacheUse::Stale)) => {
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

fn status_of(err: &EngineError) -> StatusCode {
    ApiError::from(err.clone()).status
}

/// Which tier and model answered, and how.
struct ServedBy {
    tier: String,
    model: String,
    degraded: Option<Degradation>,
    cache: Option<CacheUse>,
}

/// Per-response metric bookkeeping.
struct Accounting {
    state: AppState,
    labels: ModelLabels,
    /// False for replies replayed from the cache or followed from another response's
    /// generation: their tokens were counted once, by the response that generated them.
    generated_here: bool,
    accepted_at: Instant,
    span: tracing::Span,
}

impl Accounting {
    fn finished(&self, completion: &Completion) {
        let finish_reason = completion.finish_reason.as_str();
        self.state
            .count_request(&self.labels, StatusCode::OK.as_str(), finish_reason);
        self.span
            .record("completion_tokens", completion.usage.completion_tokens);
        self.span.record("finish_reason", finish_reason);
        let metrics = self.state.metrics();
        metrics
            .e2e_request_latency
            .get_or_create(&self.labels)
            .observe(self.accepted_at.elapsed().as_secs_f64());
        if self.generated_here {
            metrics
                .generated_tokens
                .get_or_create(&self.labels)
                .inc_by(u64::from(completion.usage.completion_tokens));
        }
        if completion.budget_cut {
            metrics
                .budget_cuts
                .get_or_create(&TierLabels {
                    tier: self.labels.tier.clone(),
                })
                .inc();
        }
    }
}

/// Every response says which tier and model served it, which rule chose the route,
/// and whether it was degraded or came from the cache.
fn with_route_headers(mut response: Response, route: &Route, served: &ServedBy) -> Response {
    let headers = response.headers_mut();
    let degraded = served.degraded.as_ref().map(ToString::to_string);
    let pairs = [
        (TIER_HEADER, Some(served.tier.as_str())),
        (MODEL_HEADER, Some(served.model.as_str())),
        (RULE_HEADER, Some(route.rule.as_str())),
        (PINNED_HEADER, route.pinned.then_some("true")),
        (DEGRADED_HEADER, degraded.as_deref()),
        (CACHE_HEADER, served.cache.map(CacheUse::as_str)),
    ];
    for (name, value) in pairs {
        if let Some(Ok(value)) = value.map(HeaderValue::from_str) {
            headers.insert(name, value);
        }
    }
    response
}

/// A whole non-streaming generation (or as much as the total budget allowed).
struct Completion {
    text: String,
    finish_reason: FinishReason,
    usage: Usage,
    budget_cut: bool,
    timings: StageTimings,
}

/// Reads one reply's events under its total budget.
struct Reply {
    source: Source,
    first: Option<TokenEvent>,
    prompt_tokens: u32,
    /// Text events delivered: the completion-token count reported when the budget cuts
    /// a reply short (a text event carries at least one token).
    pieces: u32,
    /// Where gaps between text events are observed, if they are measured for this reply.
    inter_token: Option<Histogram>,
    last_piece_at: Option<Instant>,
}

impl Reply {
    fn new(acquired: Acquired, inter_token: Option<Histogram>) -> Self {
        Self {
            source: acquired.source,
            first: Some(acquired.first),
            prompt_tokens: acquired.prompt_tokens,
            pieces: 0,
            inter_token,
            last_piece_at: None,
        }
    }

    /// The next event, or `None` when the total budget ran out first (dropping the
    /// source then cancels the sequence).
    async fn next(&mut self, deadline: Instant) -> Option<TokenEvent> {
        let event = match self.first.take() {
            Some(first) => first,
            None => tokio::time::timeout_at(deadline.into(), self.source.next_event())
                .await
                .ok()?,
        };
        if matches!(event, TokenEvent::Text(_)) {
            self.pieces += 1;
            let now = Instant::now();
            if let (Some(histogram), Some(last)) = (&self.inter_token, self.last_piece_at) {
                histogram.observe((now - last).as_secs_f64());
            }
            self.last_piece_at = Some(now);
        }
        Some(event)
    }

    /// The reply as far as it got when the total budget ran out: `length`, with the
    /// text events delivered counted as completion tokens.
    fn cut(&self, text: String) -> Completion {
        Completion {
            text,
            finish_reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.pieces,
                cached_prompt_tokens: None,
            },
            budget_cut: true,
            timings: StageTimings::default(),
        }
    }

    async fn collect(&mut self, deadline: Instant) -> Result<Completion, EngineError> {
        let mut text = String::new();
        loop {
            match self.next(deadline).await {
                Some(TokenEvent::Text(piece)) => text.push_str(&piece),
                Some(TokenEvent::Finished {
                    finish_reason,
                    usage,
                    timings,
                }) => {
                    return Ok(Completion {
                        text,
                        finish_reason,
                        usage,
                        budget_cut: false,
                        timings,
                    })
                }
                Some(TokenEvent::Failed(err)) => return Err(err),
                None => return Ok(self.cut(text)),
            }
        }
    }
}

fn complete_response(meta: &ResponseMeta, completion: &Completion) -> Response {
    let body = CompletionBody {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices: [CompletionChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: &completion.text,
            },
            logprobs: None,
            finish_reason: completion.finish_reason.as_str(),
        }],
        usage: completion.usage.into(),
    };
    match serde_json::to_string(&body) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::internal(format!("could not encode the response: {e}")).into_response(),
    }
}

impl ResponseMeta {
    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<FinishReason>) -> Bytes {
        self.choice_chunk(delta, finish_reason, None)
    }

    /// The last content chunk of a reply the total budget cut short: `finish_reason`
    /// is `length`, and a `tiergate` field says why (headers are long gone by then).
    fn budget_cut_chunk(&self) -> Bytes {
        let note = ChunkNote {
            budget_cut: "total",
            total_ms: self.total_budget_ms,
        };
        self.choice_chunk(Delta::default(), Some(FinishReason::Length), Some(note))
    }

    fn choice_chunk(
        &self,
        delta: Delta<'_>,
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
                logprobs: None,
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
    fn ending(&self, last: Bytes, usage: Usage) -> Bytes {
        let mut out = last.to_vec();
        if self.include_usage {
            out.extend_from_slice(&self.usage_chunk(usage));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }
}

struct SseState {
    meta: ResponseMeta,
    reply: Reply,
    /// The role chunk goes out with the first event.
    started: bool,
    done: bool,
    deadline: Instant,
    accounting: Accounting,
}

impl SseState {
    /// Bytes for the next event; `done` is set after the last one.
    async fn next_bytes(&mut self) -> Bytes {
        let meta = &self.meta;
        let Some(event) = self.reply.next(self.deadline).await else {
            self.done = true;
            let cut = self.reply.cut(String::new());
            self.accounting.finished(&cut);
            tracing::info!(id = %meta.id, total_ms = meta.total_budget_ms, "total budget spent: reply cut");
            return meta.ending(meta.budget_cut_chunk(), cut.usage);
        };
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
                timings,
            } => {
                self.done = true;
                self.accounting.finished(&Completion {
                    text: String::new(),
                    finish_reason,
                    usage,
                    budget_cut: false,
                    timings,
                });
                meta.ending(meta.chunk(Delta::default(), Some(finish_reason)), usage)
            }
            TokenEvent::Failed(err) => {
                self.done = true;
                tracing::warn!(id = %meta.id, %err, "generation failed after the stream started");
                let accounting = &self.accounting;
                accounting
                    .state
                    .count_request(&accounting.labels, "stream_error", "error");
                ApiError::from(err).sse_event()
            }
        }
    }
}

/// A client that leaves mid-stream drops the body: count the request as aborted, as
/// vLLM does, so every request reaches `tiergate_requests_total` once.
impl Drop for SseState {
    fn drop(&mut self) {
        if !self.done {
            let accounting = &self.accounting;
            accounting
                .state
                .count_request(&accounting.labels, "client_closed", "abort");
            accounting.span.record("finish_reason", "abort");
        }
    }
}

fn stream_response(
    meta: ResponseMeta,
    acquired: Acquired,
    deadline: Instant,
    accounting: Accounting,
    inter_token: Option<Histogram>,
) -> Response {
    let initial = SseState {
        meta,
        reply: Reply::new(acquired, inter_token),
        started: false,
        done: false,
        deadline,
        accounting,
    };
    // Dropping this stream (client gone) drops the reply's source, which the step loop
    // sees as a closed channel: the sequence leaves and its KV cells are freed.
    let body = stream::unfold(initial, |mut sse| async move {
        if sse.done {
            return None;
        }
        let bytes = if sse.started {
            sse.next_bytes().await
        } else {
            sse.started = true;
            let role = sse.meta.chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(""),
                },
                None,
            );
            let rest = sse.next_bytes().await;
            let mut both = role.to_vec();
            both.extend_from_slice(&rest);
            Bytes::from(both)
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
