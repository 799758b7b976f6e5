//! One attempt on one endpoint: send the chat request, read its SSE stream, and turn each
//! chunk into the token events every tiergate reply is built from (so the client gets
//! tiergate's own chunks: one id, its model name, its role chunk, its usage).
//!
//! The attempt never retries by itself; it reports how it ended and the fleet decides.
//! Before the first token, a failure is [`Attempt::Retry`]: nothing reached the client.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::endpoint::{InFlight, Verdict};
use crate::chat::{ReplyFormat, SamplingParams};
use crate::engine::{
    logprobs::TokenLogprob, EngineError, FinishReason, GenerationRequest, StageTimings, TokenEvent,
    Usage,
};

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    /// The reply was delivered, or the upstream's refusal of it (a client error).
    Done,
    /// The client left; the upstream request was closed by dropping it.
    ClientGone,
    /// Failed before any token reached the client: another endpoint may take it.
    Retry(String),
    /// The request could not be sent, or its connection closed before any answer (as
    /// when a pooled kept-alive connection was closed by the server at that moment, a
    /// race every HTTP/1.1 pool has): worth sending once more, to any endpoint.
    Resend(String),
    /// The endpoint answered 429: busy, not broken; another endpoint may take it.
    Overloaded(String),
}

/// The body sent upstream: the request as the client made it, with the fleet's name for
/// the model, always streamed (a non-streaming client gets the collected reply).
#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<MessageBody<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    /// Not OpenAI's, but llama-server, vLLM and SGLang take it. Sent only when the request
    /// changed it from llama.cpp's default, so other engines keep their own default.
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u32>,
    presence_penalty: f32,
    frequency_penalty: f32,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
    /// llama-server's and vLLM's extension, sent only when set.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    logit_bias: std::collections::BTreeMap<String, f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<FormatBody<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    logprobs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    /// The client's `tools`, `tool_choice` and `parallel_tool_calls`, unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
}

/// `response_format` as OpenAI defines it, rebuilt from the checked request.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum FormatBody<'a> {
    JsonObject,
    JsonSchema { json_schema: SchemaBody<'a> },
}

#[derive(Serialize)]
struct SchemaBody<'a> {
    name: &'a str,
    schema: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
struct MessageBody<'a> {
    role: &'static str,
    /// `null` for an assistant message that only called tools, as OpenAI has it.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The serialized upstream body of `request`, sent as is on every attempt.
pub fn chat_body(request: &GenerationRequest, model: &str, max_tokens: u32) -> Bytes {
    let SamplingParams {
        temperature,
        top_p,
        top_k,
        seed,
        presence_penalty,
        frequency_penalty,
        ref logit_bias,
    } = request.sampling;
    let tools = request.tools.as_deref();
    let response_format = match &request.format {
        ReplyFormat::Text => None,
        ReplyFormat::JsonObject => Some(FormatBody::JsonObject),
        ReplyFormat::JsonSchema {
            name,
            schema,
            strict,
        } => Some(FormatBody::JsonSchema {
            json_schema: SchemaBody {
                name,
                schema: parse_json(schema),
                strict: *strict,
            },
        }),
    };
    let body = ChatBody {
        model,
        messages: request
            .messages
            .iter()
            .enumerate()
            .map(|(index, m)| {
                let tool_calls = tools.and_then(|t| t.calls_of(index)).map(parse_json);
                MessageBody {
                    role: m.role.as_str(),
                    content: (tool_calls.is_none() || !m.content.is_empty())
                        .then_some(m.content.as_str()),
                    tool_calls,
                    tool_call_id: tools.and_then(|t| t.call_id_of(index)),
                }
            })
            .collect(),
        stream: true,
        stream_options: StreamOptions {
            include_usage: true,
        },
        max_tokens,
        temperature,
        top_p,
        top_k: (top_k != SamplingParams::default().top_k).then_some(top_k),
        seed,
        presence_penalty,
        frequency_penalty,
        stop: &request.stop,
        ignore_eos: request.ignore_eos,
        logit_bias: logit_bias
            .iter()
            .map(|&(token, bias)| (token.to_string(), bias))
            .collect(),
        response_format,
        logprobs: request.logprobs.is_some(),
        top_logprobs: request.logprobs.filter(|&k| k > 0),
        tools: tools.and_then(|t| t.tools.as_deref()).map(parse_json),
        tool_choice: tools.and_then(|t| t.tool_choice.as_deref()).map(parse_json),
        parallel_tool_calls: tools.and_then(|t| t.parallel_tool_calls),
    };
    // Plain structs and parsed JSON values: serializing cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// JSON the API layer serialized from a parsed value, parsed back to be sent on.
fn parse_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_default()
}

/// The parts of an OpenAI stream chunk that matter here; anything else is ignored, and
/// so is a `null` where an object or list should be (servers differ in these).
#[derive(Deserialize, Debug, Default)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    /// Read field by field ([`usage_of`]): a usage this parser cannot read is not a
    /// reason to fail a reply that was delivered.
    #[serde(default)]
    usage: Option<serde_json::Value>,
    /// Some servers put an error object in a data line instead of an `error` event.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    logprobs: Option<ChunkLogprobs>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct ChunkLogprobs {
    /// Read leniently ([`logprobs_of`]): servers differ in these, and log probabilities
    /// this parser cannot read are no reason to fail a reply that was delivered.
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// The entries of an upstream `logprobs.content`, when they have OpenAI's shape.
fn logprobs_of(content: serde_json::Value) -> Option<Vec<TokenLogprob>> {
    serde_json::from_value(content).ok()
}

#[derive(Deserialize, Debug, Default)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<serde_json::Value>>,
}

/// The token counts of an upstream `usage` object, when it has the two that matter.
fn usage_of(usage: &serde_json::Value) -> Option<Usage> {
    let count = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    Some(Usage {
        prompt_tokens: count(usage.get("prompt_tokens")?)?,
        completion_tokens: count(usage.get("completion_tokens")?)?,
        cached_prompt_tokens: usage
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(count),
    })
}

/// The message of an OpenAI error body (`{"error":{"message":...}}`), else the text.
pub fn error_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let error = v.get("error").unwrap_or(v);
        error
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| error.as_str())
            .map(str::to_owned)
    });
    let text = message.unwrap_or_else(|| body.trim().to_owned());
    // Bounded: it goes into logs, metrics' last_error and the client's message.
    text.chars().take(300).collect()
}

/// Statuses whose refusal is about the request itself: any endpoint would answer the same.
fn is_client_error(status: u16) -> bool {
    matches!(status, 400 | 413 | 422)
}

/// How the upstream says its reply ended: `Err` for an ending that is a failure (vLLM's
/// and SGLang's `abort`, `error`), which must not pass for a complete reply.
fn finish_reason(reason: &str) -> Result<FinishReason, String> {
    match reason {
        "length" => Ok(FinishReason::Length),
        "tool_calls" | "function_call" => Ok(FinishReason::ToolCalls),
        "abort" | "error" => Err(format!("ended the reply with finish_reason `{reason}`")),
        // `stop`, and endings tiergate has no name for (`content_filter`).
        _ => Ok(FinishReason::Stop),
    }
}

/// At most this much of an error body is read: it only feeds a message.
const ERROR_BODY_LIMIT: usize = 16 << 10;

/// The start of an error response's body, read for at most two seconds and not past the
/// attempt's deadline (by much: a body already sent takes a moment to read).
async fn error_body(mut response: reqwest::Response, deadline: Instant) -> String {
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() >= ERROR_BODY_LIMIT {
                break;
            }
        }
    };
    let now = Instant::now();
    let until = (now + Duration::from_secs(2)).min(deadline.max(now + Duration::from_millis(50)));
    let _ = tokio::time::timeout_at(until, read).await;
    body.truncate(ERROR_BODY_LIMIT);
    String::from_utf8_lossy(&body).into_owned()
}

/// Where one attempt is when it ends, for its verdict and its events.
pub struct Call<'a> {
    pub client: &'a reqwest::Client,
    pub api_key: Option<&'a str>,
    pub body: Bytes,
    pub events: &'a mpsc::UnboundedSender<TokenEvent>,
    /// The first token must come by then, or the attempt is abandoned for another endpoint.
    pub first_token_by: Instant,
    /// `first_token_by` is this endpoint's share of the request's budget, not the fleet's
    /// own `first_token_timeout_ms`: missing it makes the endpoint late, not faulty.
    pub deadline_is_budget: bool,
    /// A failure to send is answered with [`Attempt::Resend`] (not yet resent once).
    pub may_resend: bool,
    /// Longest wait for the next chunk once streaming.
    pub idle_timeout: Duration,
    /// Our count, reported when the upstream sends no usage.
    pub prompt_tokens: u32,
    /// Called once, just before the first text event is sent.
    pub on_first_token: &'a (dyn Fn(&str) + Sync),
}

/// Sends the request to `in_flight`'s endpoint and relays its reply. Whatever happens, the
/// verdict is recorded on `in_flight` before it returns.
pub async fn attempt(call: Call<'_>, in_flight: &mut InFlight) -> Attempt {
    let sent_at = Instant::now();
    let endpoint = in_flight.endpoint();
    let url = endpoint.url.clone();
    let mut request = call
        .client
        .post(&endpoint.chat_url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .body(call.body.clone());
    if let Some(key) = call.api_key {
        request = request.bearer_auth(key);
    }
    // No first token by the deadline: faulty past the fleet's own timeout, late otherwise.
    let late = |why: String| match call.deadline_is_budget {
        true => (Verdict::Late, "first_token_late", why),
        false => (Verdict::Failed(why.clone()), "first_token_timeout", why),
    };
    let mut fail = |outcome: &'static str, why: String| {
        in_flight.end(Verdict::Failed(why.clone()), outcome);
        Attempt::Retry(why)
    };
    let response = tokio::select! {
        biased;
        () = call.events.closed() => return Attempt::ClientGone,
        sent = tokio::time::timeout_at(call.first_token_by, request.send()) => sent,
    };
    let response = match response {
        Err(_) => {
            let waited = sent_at.elapsed().as_millis();
            let (verdict, outcome, why) = late(format!("no response within {waited} ms"));
            in_flight.end(verdict, outcome);
            return Attempt::Retry(why);
        }
        Ok(Err(e)) if e.is_connect() => {
            return fail("connect_error", format!("cannot connect: {e}"))
        }
        Ok(Err(e)) if call.may_resend && e.is_request() && !e.is_timeout() => {
            let why = format!("the request failed: {e}");
            in_flight.end(Verdict::Busy, "send_error");
            return Attempt::Resend(why);
        }
        Ok(Err(e)) => return fail("send_error", format!("the request failed: {e}")),
        Ok(Ok(response)) => response,
    };
    let status = response.status().as_u16();
    if !response.status().is_success() {
        let message = error_message(&error_body(response, call.first_token_by).await);
        if is_client_error(status) {
            in_flight.end(Verdict::Answered, "rejected");
            let _ = call
                .events
                .send(TokenEvent::Failed(EngineError::UpstreamRejected {
                    status,
                    message,
                }));
            return Attempt::Done;
        }
        if status == 429 {
            // Overloaded, not broken: another endpoint may take it, and this one stays in.
            in_flight.end(Verdict::Busy, "http_429");
            return Attempt::Overloaded(format!("answered 429: {message}"));
        }
        let outcome = match status {
            500 => "http_500",
            502 => "http_502",
            503 => "http_503",
            504 => "http_504",
            _ => "http_other",
        };
        return fail(outcome, format!("answered {status}: {message}"));
    }
    let headers_at = Instant::now();
    let mut stream = response.bytes_stream().eventsource();
    let mut first_token_at: Option<Instant> = None;
    let mut pieces = 0u32;
    let mut finish: Option<FinishReason> = None;
    let mut usage: Option<Usage> = None;
    // A failure: before any text reached the client, another endpoint may take the
    // request; after, the reply ends with an error event.
    let failed = |in_flight: &mut InFlight, text_sent: bool, outcome: &'static str, why: String| {
        in_flight.end(Verdict::Failed(why.clone()), outcome);
        if !text_sent {
            return Attempt::Retry(why);
        }
        let _ = call
            .events
            .send(TokenEvent::Failed(EngineError::Upstream(format!(
                "{url}: {why}"
            ))));
        Attempt::Done
    };
    loop {
        let wait_until = match first_token_at {
            None => call.first_token_by,
            Some(_) => Instant::now() + call.idle_timeout,
        };
        let next = tokio::select! {
            biased;
            () = call.events.closed() => return Attempt::ClientGone,
            next = tokio::time::timeout_at(wait_until, stream.next()) => next,
        };
        let streaming = first_token_at.is_some();
        let event = match next {
            // The reply had ended; only the usage or `[DONE]` was still to come.
            Err(_) if finish.is_some() => break,
            Err(_) if !streaming => {
                let waited = sent_at.elapsed().as_millis();
                let (verdict, outcome, why) = late(format!("no first token within {waited} ms"));
                in_flight.end(verdict, outcome);
                return Attempt::Retry(why);
            }
            Err(_) => {
                let idle = call.idle_timeout.as_millis();
                return failed(
                    in_flight,
                    true,
                    "stalled",
                    format!("no chunk for {idle} ms mid-reply"),
                );
            }
            Ok(Some(Ok(event))) => event,
            // The connection ended: fine after the last chunk, a failure before it.
            Ok(None) | Ok(Some(Err(_))) if finish.is_some() => break,
            Ok(None) | Ok(Some(Err(_))) => {
                let why = match streaming {
                    false => "closed the stream before any token".to_owned(),
                    true => format!("the connection closed mid-reply after {pieces} pieces"),
                };
                return failed(in_flight, streaming, "dropped_mid_stream", why);
            }
        };
        if event.event == "error" {
            let why = format!("sent an error: {}", error_message(&event.data));
            return failed(in_flight, streaming, "error_event", why);
        }
        if event.data.trim() == "[DONE]" {
            break;
        }
        let chunk: Chunk = match serde_json::from_str(&event.data) {
            Ok(chunk) => chunk,
            Err(e) => {
                let why = format!("sent a chunk that is not OpenAI's ({e})");
                return failed(in_flight, streaming, "malformed", why);
            }
        };
        if let Some(error) = chunk.error {
            let why = format!("sent an error: {}", error_message(&error.to_string()));
            return failed(in_flight, streaming, "error_event", why);
        }
        for choice in chunk.choices.unwrap_or_default() {
            let delta = choice.delta.unwrap_or_default();
            let logprobs = choice
                .logprobs
                .and_then(|l| l.content)
                .and_then(logprobs_of);
            let text = delta.content.filter(|t| !t.is_empty());
            let calls = delta.tool_calls.filter(|c| !c.is_empty());
            // Text first, then tool calls, as a chunk lists them.
            let events = [
                text.map(|text| match logprobs {
                    Some(logprobs) => TokenEvent::Scored { text, logprobs },
                    None => TokenEvent::Text(text),
                }),
                calls.map(TokenEvent::ToolCalls),
            ];
            for event in events.into_iter().flatten() {
                if first_token_at.is_none() {
                    first_token_at = Some(Instant::now());
                    in_flight.first_token();
                    (call.on_first_token)(&url);
                }
                pieces += 1;
                if call.events.send(event).is_err() {
                    return Attempt::ClientGone;
                }
            }
            match choice.finish_reason.as_deref().map(finish_reason) {
                Some(Ok(reason)) => finish = Some(reason),
                Some(Err(why)) => {
                    return failed(in_flight, first_token_at.is_some(), "aborted", why)
                }
                None => {}
            }
        }
        if let Some(read) = chunk.usage.as_ref().and_then(usage_of) {
            usage = Some(read);
        }
    }
    in_flight.end(Verdict::Answered, "ok");
    if first_token_at.is_none() {
        // An empty reply still names who gave it.
        in_flight.first_token();
        (call.on_first_token)(&url);
    }
    let ended_at = Instant::now();
    let first = first_token_at.unwrap_or(ended_at);
    // Without usage from upstream: our prompt count and a token per piece (a lower bound:
    // servers send one or more tokens per chunk).
    let usage = usage.unwrap_or(Usage {
        prompt_tokens: call.prompt_tokens,
        completion_tokens: pieces,
        cached_prompt_tokens: None,
    });
    let _ = call.events.send(TokenEvent::Finished {
        finish_reason: finish.unwrap_or(FinishReason::Stop),
        usage,
        timings: StageTimings {
            // Until the upstream answered with its headers: connecting and its queue.
            queue: headers_at - sent_at,
            prefill: first - headers_at,
            decode: ended_at - first,
        },
    });
    Attempt::Done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatMessage;

    #[test]
    fn error_messages_come_from_openai_bodies_or_the_text() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad thing","type":"x"}}"#),
            "bad thing"
        );
        assert_eq!(error_message(r#"{"error":"plain"}"#), "plain");
        assert_eq!(
            error_message("  Service Unavailable \n"),
            "Service Unavailable"
        );
    }

    #[test]
    fn chunks_with_nulls_and_odd_usage_still_parse() {
        let chunk: Chunk = serde_json::from_str(
            r#"{"choices":[{"delta":null,"finish_reason":null}],"usage":{"prompt_tokens":3}}"#,
        )
        .expect("lenient");
        assert!(chunk.choices.expect("choices")[0].delta.is_none());
        assert_eq!(
            chunk.usage.as_ref().and_then(usage_of),
            None,
            "half a usage is none"
        );
        let chunk: Chunk = serde_json::from_str(r#"{"choices":null}"#).expect("null choices");
        assert!(chunk.choices.is_none());
        let usage = serde_json::json!({"prompt_tokens": 3, "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 1}});
        assert_eq!(
            usage_of(&usage),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_prompt_tokens: Some(1)
            })
        );
    }

    #[test]
    fn an_aborted_reply_is_a_failure_not_a_stop() {
        assert_eq!(finish_reason("length"), Ok(FinishReason::Length));
        assert_eq!(finish_reason("content_filter"), Ok(FinishReason::Stop));
        assert!(finish_reason("abort").is_err());
        assert!(finish_reason("error").is_err());
    }

    #[test]
    fn the_upstream_body_streams_with_usage_and_keeps_the_clients_settings() {
        let request = GenerationRequest {
            messages: vec![ChatMessage::user("hi")],
            sampling: SamplingParams {
                temperature: 0.0,
                seed: Some(7),
                ..SamplingParams::default()
            },
            max_tokens: Some(5),
            max_tokens_cap: None,
            stop: vec!["\n".into()],
            ignore_eos: false,
            span: tracing::Span::none(),
            first_token_by: None,
            ..GenerationRequest::default()
        };
        let body: serde_json::Value =
            serde_json::from_slice(&chat_body(&request, "served-name", 5)).expect("json");
        assert_eq!(body["model"], "served-name");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"][0]["role"], "user");
        assert_eq!(body["max_tokens"], 5);
        assert_eq!(body["seed"], 7);
        assert_eq!(body["stop"][0], "\n");
        // Left to each engine's own default when the client did not change it.
        assert!(body.get("top_k").is_none());
        assert!(body.get("ignore_eos").is_none());
    }
}
