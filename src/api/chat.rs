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
use futures::{stream, FutureExt as _, StreamExt as _};

use super::error::ApiError;
use super::types::{
    AssistantMessage, ChunkBody, ChunkChoice, ChunkNote, CompletionBody, CompletionChoice, Delta,
    LogprobsBody, UsageBody,
};
use super::{AppState, Authorized};
use crate::budget::CacheUse;
use crate::engine::logprobs::TokenLogprob;
use crate::engine::{FinishReason, StageTimings, Usage};
use crate::gateway::{Completion, Ending, OtherChoice, Reply, ReplyEvent, Served};

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
    let mut served = state.gateway().serve(caller, request).await?;
    let headers = route_headers(&served);
    let other_choices = std::mem::take(&mut served.other_choices);
    let mut response = if stream && other_choices.is_empty() {
        stream_response(ResponseMeta::for_stream(&served), served.reply)
    } else if stream {
        stream_choices_response(ResponseMeta::of(&served), served.reply, other_choices)
    } else {
        let meta = ResponseMeta::of(&served);
        let route_time = served.route_time;
        // Read together, each under its budget; the first failure drops the others,
        // which cancels their sequences.
        let (first, others) = futures::future::try_join(
            served.reply.collect(),
            futures::future::try_join_all(other_choices.into_iter().map(OtherChoice::collect)),
        )
        .await?;
        let completions: Vec<Completion> = std::iter::once(first).chain(others).collect();
        let completion = &completions[0];
        let mut response = complete_response(&meta, &completions, wants_logprobs);
        let timing = server_timing(route_time, &completion.ending.timings, meta.cache);
        response.headers_mut().extend(
            HeaderValue::from_str(&timing)
                .ok()
                .map(|v| (SERVER_TIMING, v)),
        );
        if completions.iter().any(|c| c.ending.budget_cut) {
            let cut = HeaderValue::from_static("total");
            response.headers_mut().insert(BUDGET_CUT_HEADER, cut);
        }
        response
    };
    let response_headers = response.headers_mut();
    // Grown once for the route headers, not once per header as they are appended.
    response_headers.reserve(headers.len());
    response_headers.extend(headers);
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
    let mut header = String::with_capacity(96);
    push_stage(&mut header, "route", route);
    match cache {
        Some(replayed) if replayed.replayed() => {
            header.push_str(", cache;desc=");
            header.push_str(replayed.as_str());
        }
        _ => {
            for (name, took) in [
                ("queue", stages.queue),
                ("prefill", stages.prefill),
                ("decode", stages.decode),
            ] {
                header.push_str(", ");
                push_stage(&mut header, name, took);
            }
        }
    }
    header
}

/// `name;dur=12.345`: milliseconds with three decimals, truncated to the microsecond.
/// Written from integer microseconds without `core::fmt`: formatting was most of the
/// header's cost on a cache hit.
fn push_stage(header: &mut String, name: &str, took: Duration) {
    let micros = took.as_micros();
    header.push_str(name);
    header.push_str(";dur=");
    header.push_str(itoa::Buffer::new().format(micros / 1000));
    header.push('.');
    let fraction = (micros % 1000) as u32;
    for digit in [fraction / 100, fraction / 10 % 10, fraction % 10] {
        header.push(char::from(b'0' + digit as u8));
    }
}

/// Every response says which tier and model served it, which rule chose the route,
/// and whether it was degraded or came from the cache. A list, not a `HeaderMap`: they
/// are appended to the response's own map, and hashing them twice showed on cache hits.
fn route_headers(served: &Served) -> Vec<(HeaderName, HeaderValue)> {
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
    /// Choice 0's text chunk rendered once, around its content.
    text_frame: Option<TextFrame>,
}

/// A text chunk of one response up to its content (`head`, from `data: `) and after it
/// (`tail`, to the blank line). Every text chunk of choice 0 differs only in the content,
/// so rendering the envelope once makes each token's chunk a copy of the two around its
/// escaped text: byte for byte what serializing the whole chunk writes (a test checks),
/// for a fraction of the cost that serializing cost a streamed cache hit.
struct TextFrame {
    head: Vec<u8>,
    tail: Vec<u8>,
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
            text_frame: None,
        }
    }

    /// For a single-choice stream: with its text frame rendered.
    fn for_stream(served: &Served) -> Self {
        let mut meta = Self::of(served);
        meta.text_frame = meta.render_text_frame();
        meta
    }

    /// Renders an empty text chunk of choice 0 and splits it at the content's `""`.
    fn render_text_frame(&self) -> Option<TextFrame> {
        // Unique in the chunk: quotes inside the id or model name are escaped.
        const EMPTY_CONTENT: &[u8] = br#""delta":{"content":"""#;
        let chunk = self.choice_chunk(0, text_delta(""), None, None, None);
        let at = chunk
            .windows(EMPTY_CONTENT.len())
            .rposition(|window| window == EMPTY_CONTENT)?;
        let split = at + EMPTY_CONTENT.len() - 2;
        Some(TextFrame {
            head: chunk[..split].to_vec(),
            tail: chunk[split + 2..].to_vec(),
        })
    }

    /// Choice 0's chunk for `text`, from the rendered frame.
    fn text_chunk(&self, text: &str) -> Bytes {
        let Some(frame) = &self.text_frame else {
            return self.choice_chunk(0, text_delta(text), None, None, None);
        };
        let mut chunk = Vec::with_capacity(frame.head.len() + text.len() + 2 + frame.tail.len());
        chunk.extend_from_slice(&frame.head);
        // Writing a string into a Vec cannot fail.
        if serde_json::to_writer(&mut chunk, text).is_err() {
            return self.choice_chunk(0, text_delta(text), None, None, None);
        }
        chunk.extend_from_slice(&frame.tail);
        Bytes::from(chunk)
    }

    /// The first chunk of choice `index`: its role.
    fn role_chunk(&self, index: u32) -> Bytes {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            tool_calls: None,
        };
        self.choice_chunk(index, delta, None, None, None)
    }

    /// The chunk that ends choice `index`. A reply the total budget cut short ends with
    /// `length` and a `tiergate` field that says why (headers are long gone by then).
    fn finish_chunk(&self, index: u32, ending: &Ending) -> Bytes {
        let note = ending.budget_cut.then_some(ChunkNote {
            budget_cut: "total",
            total_ms: self.total_budget_ms,
        });
        let reason = Some(ending.finish_reason);
        self.choice_chunk(index, Delta::default(), None, reason, note)
    }

    fn choice_chunk(
        &self,
        index: u32,
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
            choices: Some(ChunkChoice {
                index,
                delta,
                logprobs: logprobs.map(|content| LogprobsBody { content }),
                finish_reason: finish_reason.map(FinishReason::as_str),
            }),
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
            choices: None,
            usage: Some(Some(UsageBody::from(usage))),
            tiergate: None,
        })
    }

    fn encode(&self, chunk: &ChunkBody<'_>) -> Bytes {
        let mut event = Vec::with_capacity(256);
        event.extend_from_slice(b"data: ");
        // Serializing these plain structs cannot fail; an empty object keeps the stream
        // well-formed if it did.
        if serde_json::to_writer(&mut event, chunk).is_err() {
            event.truncate(b"data: ".len());
            event.extend_from_slice(b"{}");
        }
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }

    /// The end of a stream, after every choice's finishing chunk: the usage chunk if
    /// asked, then `[DONE]`.
    fn done(&self, usage: Usage) -> Bytes {
        let mut out = Vec::new();
        if self.include_usage {
            out.extend_from_slice(&self.usage_chunk(usage));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }

    /// The chunk of choice `index` for a content event (text, scored text, tool calls);
    /// `None` for endings and failures.
    fn content_chunk(&self, index: u32, event: &ReplyEvent) -> Option<Bytes> {
        let (delta, logprobs) = match event {
            ReplyEvent::Text(text) => (text_delta(text), None),
            ReplyEvent::Scored { text, logprobs } => (text_delta(text), Some(logprobs.as_slice())),
            ReplyEvent::ToolCalls(calls) => (
                Delta {
                    tool_calls: Some(calls),
                    ..Delta::default()
                },
                None,
            ),
            ReplyEvent::Finished(_) | ReplyEvent::Failed(_) => return None,
        };
        Some(self.choice_chunk(index, delta, logprobs, None, None))
    }

    /// The bytes for one event of a single-choice reply.
    fn event(&self, event: ReplyEvent) -> Bytes {
        if let ReplyEvent::Text(text) = &event {
            return self.text_chunk(text);
        }
        if let Some(chunk) = self.content_chunk(0, &event) {
            return chunk;
        }
        match event {
            ReplyEvent::Finished(ending) => {
                let mut out = self.finish_chunk(0, &ending).to_vec();
                out.extend_from_slice(&self.done(ending.usage));
                Bytes::from(out)
            }
            ReplyEvent::Failed(err) => ApiError::from(err).sse_event(),
            // Content events were rendered above.
            _ => Bytes::new(),
        }
    }
}

fn text_delta(text: &str) -> Delta<'_> {
    Delta {
        content: Some(text),
        ..Delta::default()
    }
}

/// The non-streaming reply: every choice, and usage with every choice's completion tokens
/// (the prompt counted once, as OpenAI does).
fn complete_response(meta: &ResponseMeta, completions: &[Completion], logprobs: bool) -> Response {
    let choices = completions
        .iter()
        .zip(0..)
        .map(|(completion, index)| CompletionChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: if completion.text.is_empty() && !completion.tool_calls.is_empty() {
                    None
                } else {
                    Some(&completion.text)
                },
                tool_calls: &completion.tool_calls,
            },
            // Asked for and none to give (an empty reply, an upstream that sent none):
            // an empty list.
            logprobs: logprobs.then(|| LogprobsBody {
                content: completion.logprobs.as_deref().unwrap_or_default(),
            }),
            finish_reason: completion.ending.finish_reason.as_str(),
        })
        .collect();
    let usage = total_usage(completions.iter().map(|c| c.ending.usage));
    let body = CompletionBody {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices,
        usage: usage.into(),
    };
    // Sized for the envelope and the text up front: growing it showed on cache hits.
    let text_bytes: usize = completions.iter().map(|c| c.text.len()).sum();
    let mut json = Vec::with_capacity(384 + text_bytes);
    if let Err(e) = serde_json::to_writer(&mut json, &body) {
        return ApiError::internal(format!("could not encode the response: {e}")).into_response();
    }
    let mut response = Response::new(Body::from(json));
    // Room for the route and timing headers that the handler adds.
    *response.headers_mut() = HeaderMap::with_capacity(12);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// One request's usage over its choices: the first choice's prompt and cached tokens, and
/// the completion tokens of all.
fn total_usage(usages: impl IntoIterator<Item = Usage>) -> Usage {
    let mut usages = usages.into_iter();
    let Some(first) = usages.next() else {
        return Usage::default();
    };
    usages.fold(first, |total, usage| Usage {
        completion_tokens: total.completion_tokens + usage.completion_tokens,
        ..total
    })
}

/// Most bytes of ready events written together, so that a long replayed reply starts
/// going out before all of it is rendered.
const COALESCE_BYTES: usize = 32 * 1024;

fn stream_response(meta: ResponseMeta, reply: Reply) -> Response {
    // The role chunk goes out with the first event, so the first chunk a client sees is
    // the first token's.
    let role = meta.role_chunk(0);
    // Dropping this stream (client gone) drops the reply and its source, which the step
    // loop sees as a closed channel: the sequence leaves and its KV cells are freed.
    let body = stream::unfold(
        (meta, reply, Some(role)),
        |(meta, mut reply, role)| async move {
            let event = reply.next().await?;
            // The first write carries the role and, for a replay, most often the whole
            // reply; later ones a token or a few. Sized so that neither grows as a rule.
            let mut bytes = BytesMut::with_capacity(if role.is_some() { 4096 } else { 512 });
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
    sse_response(Body::from_stream(body))
}

/// A `text/event-stream` response around `body`.
fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Tell nginx-style proxies not to buffer the stream.
        .header("x-accel-buffering", "no")
        .body(body)
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

/// The stream of a request with `n` > 1: every choice's chunks as they come, each with
/// its `index`; the usage chunk (if asked) and `[DONE]` once the last choice has ended.
/// A failure of any choice ends the stream with its error event (dropping the others
/// cancels their sequences).
fn stream_choices_response(meta: ResponseMeta, reply: Reply, others: Vec<OtherChoice>) -> Response {
    let choices = others.len() + 1;
    let first = stream::unfold(reply, |mut reply| async move {
        let event = reply.next().await?;
        Some(((0u32, event), reply))
    })
    .boxed();
    let rest = others.into_iter().zip(1u32..).map(|(choice, index)| {
        stream::unfold(choice, move |mut choice| async move {
            let event = choice.next().await?;
            Some(((index, event), choice))
        })
        .boxed()
    });
    let events = stream::select_all(std::iter::once(first).chain(rest));
    let started = vec![false; choices];
    let state = (meta, events, started, Vec::<Usage>::new(), false);
    let body = stream::unfold(
        state,
        |(meta, mut events, mut started, mut endings, over)| async move {
            if over {
                return None;
            }
            let (index, event) = events.next().await?;
            let mut bytes = BytesMut::new();
            // The role goes out with each choice's first event.
            if let Some(first) = started.get_mut(index as usize).filter(|s| !**s) {
                *first = true;
                bytes.extend_from_slice(&meta.role_chunk(index));
            }
            let mut over = false;
            if let Some(chunk) = meta.content_chunk(index, &event) {
                bytes.extend_from_slice(&chunk);
            } else if let ReplyEvent::Finished(ending) = &event {
                bytes.extend_from_slice(&meta.finish_chunk(index, ending));
                endings.push(ending.usage);
                if endings.len() == started.len() {
                    bytes.extend_from_slice(&meta.done(total_usage(endings.iter().copied())));
                    over = true;
                }
            } else if let ReplyEvent::Failed(err) = event {
                bytes.extend_from_slice(&ApiError::from(err).sse_event());
                over = true;
            }
            Some((
                Ok::<Bytes, Infallible>(bytes.freeze()),
                (meta, events, started, endings, over),
            ))
        },
    );
    sse_response(Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_gives_milliseconds_with_three_decimals() {
        let stages = StageTimings {
            queue: Duration::from_nanos(999),
            prefill: Duration::from_micros(1_005),
            decode: Duration::from_micros(12_345_678),
        };
        assert_eq!(
            server_timing(Duration::from_micros(7), &stages, Some(CacheUse::Miss)),
            "route;dur=0.007, queue;dur=0.000, prefill;dur=1.005, decode;dur=12345.678"
        );
        assert_eq!(
            server_timing(Duration::from_micros(1_230), &stages, Some(CacheUse::Hit)),
            "route;dur=1.230, cache;desc=hit"
        );
        assert_eq!(
            server_timing(Duration::ZERO, &StageTimings::default(), None),
            "route;dur=0.000, queue;dur=0.000, prefill;dur=0.000, decode;dur=0.000"
        );
    }

    fn meta(model: &str, include_usage: bool) -> ResponseMeta {
        let mut meta = ResponseMeta {
            id: "chatcmpl-0123456789abcdef".into(),
            created: 1_764_000_000,
            model: model.into(),
            include_usage,
            total_budget_ms: 30_000,
            cache: None,
            text_frame: None,
        };
        meta.text_frame = meta.render_text_frame();
        meta
    }

    #[test]
    fn text_chunks_from_the_frame_equal_serialized_ones() {
        let texts = [
            "",
            "Paris",
            " the \"capital\"\n\tof",
            "\u{0}\u{1f}\u{7f} back\\slash",
            "é 東京 🚀",
            r#""delta":{"content":""#,
        ];
        for model in ["smollm2", r#"odd "delta":{"content":"" name"#] {
            for include_usage in [false, true] {
                let meta = meta(model, include_usage);
                assert!(meta.text_frame.is_some(), "no frame for {model:?}");
                for text in texts {
                    let whole = meta.choice_chunk(0, text_delta(text), None, None, None);
                    assert_eq!(
                        meta.text_chunk(text),
                        whole,
                        "model {model:?}, usage {include_usage}, text {text:?}"
                    );
                }
            }
        }
    }
}
