//! The engine boundary: submit a generation request, get back a stream of token events.
//!
//! Everything above this trait (HTTP, routing, budgets) is testable without llama.cpp; the
//! real implementation is [`llama::LlamaEngine`], one OS thread per model running a
//! continuous-batching step loop.

pub mod grammar;
pub mod llama;
pub mod load;
pub mod logprobs;
pub mod prompt;
pub mod schedule;
pub mod scripted;
pub mod text;
pub mod tokenizer;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;

use crate::chat::{ChatMessage, ReplyFormat, SamplingParams, ToolSpec};

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// `None`: the model's configured default, clamped to the context left after the prompt.
    pub max_tokens: Option<u32>,
    /// A routing policy's limit on the default above (an explicit `max_tokens` has
    /// already been clamped to it by the caller).
    pub max_tokens_cap: Option<u32>,
    pub stop: Vec<String>,
    /// See [`crate::chat::ChatRequest::ignore_eos`].
    pub ignore_eos: bool,
    /// The shape the reply must take; a local engine enforces it while sampling.
    pub format: ReplyFormat,
    /// See [`crate::chat::ChatRequest::logprobs`].
    pub logprobs: Option<u8>,
    /// See [`crate::chat::ChatRequest::tools`].
    pub tools: Option<Arc<ToolSpec>>,
    /// Choices to generate: the prompt is prefilled once, the others start from copies
    /// of its cells; see [`TokenStream::take_siblings`].
    pub n: u32,
    /// The request's span: the engine's `queue`, `prefill` and `decode` spans are its
    /// children. Not part of what the model generates.
    pub span: tracing::Span,
    /// When the budget's watchdog gives up on this backend. A fleet uses it to move to
    /// another endpoint in time; the local engine has no other place to go.
    pub first_token_by: Option<tokio::time::Instant>,
}

/// No messages and default settings, for tests and benches that set a few fields.
impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            messages: Vec::new(),
            sampling: SamplingParams::default(),
            max_tokens: None,
            max_tokens_cap: None,
            stop: Vec::new(),
            ignore_eos: false,
            format: ReplyFormat::Text,
            logprobs: None,
            tools: None,
            n: 1,
            span: tracing::Span::none(),
            first_token_by: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of generation or a stop string.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
    /// The model called tools (remote tiers): the reply is its `tool_calls`.
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV cells came from the prefix cache instead of prefill;
    /// `None` when not known (a reply cut by its budget before the engine reported).
    pub cached_prompt_tokens: Option<u32>,
}

impl Usage {
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Where one generation's time went, for `Server-Timing` and the stage histograms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// From `submit` to a slot.
    pub queue: Duration,
    /// From the slot to the first sampled token (the prompt's prefill and that step).
    pub prefill: Duration,
    /// From the first token to the last.
    pub decode: Duration,
}

/// What a sequence sends back to whoever submitted it.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// Complete UTF-8 text, never empty, never part of a stop string.
    Text(String),
    /// Text with the log probabilities of the tokens it came from (only for requests that
    /// ask for `logprobs`; same rules for the text).
    Scored {
        text: String,
        logprobs: Vec<logprobs::TokenLogprob>,
    },
    /// Streamed `tool_calls` deltas from a remote tier, as OpenAI's chunks carry them
    /// (`index`, and `id`, `type`, `function.name`, `function.arguments` in parts).
    ToolCalls(Vec<serde_json::Value>),
    /// The last event of a successful generation.
    Finished {
        finish_reason: FinishReason,
        usage: Usage,
        /// Zero for replies replayed from the cache.
        timings: StageTimings,
    },
    /// The last event of a failed generation.
    Failed(EngineError),
}

/// The receiving end of one sequence. Dropping it cancels the sequence: the step loop sees
/// the closed channel before its next step and frees the sequence's slot and KV cells.
#[derive(Debug)]
pub struct TokenStream {
    pub prompt_tokens: u32,
    events: mpsc::UnboundedReceiver<TokenEvent>,
    /// The remote endpoint that answers, set before its first text event is sent.
    answered_by: Option<Arc<OnceLock<String>>>,
    /// Choices 1.. of a request with `n` > 1, each its own stream (this one is choice 0).
    siblings: Vec<TokenStream>,
}

impl TokenStream {
    pub fn new(prompt_tokens: u32, events: mpsc::UnboundedReceiver<TokenEvent>) -> Self {
        Self {
            prompt_tokens,
            events,
            answered_by: None,
            siblings: Vec::new(),
        }
    }

    /// This stream as choice 0 of a request whose other choices come on `siblings`.
    pub fn with_siblings(mut self, siblings: Vec<TokenStream>) -> Self {
        self.siblings = siblings;
        self
    }

    /// The streams of choices 1.. (empty for `n` = 1); dropping one cancels its sequence.
    pub fn take_siblings(&mut self) -> Vec<TokenStream> {
        std::mem::take(&mut self.siblings)
    }

    /// A stream whose sender records, in `answered_by`, which endpoint serves it.
    pub fn remote(
        prompt_tokens: u32,
        events: mpsc::UnboundedReceiver<TokenEvent>,
        answered_by: Arc<OnceLock<String>>,
    ) -> Self {
        Self {
            answered_by: Some(answered_by),
            ..Self::new(prompt_tokens, events)
        }
    }

    /// The endpoint that answers, for a remote backend once its first event is in.
    pub fn endpoint(&self) -> Option<&str> {
        self.answered_by.as_ref()?.get().map(String::as_str)
    }

    /// Where the endpoint that answers will be recorded, for readers of a shared copy.
    pub fn endpoint_slot(&self) -> Option<Arc<OnceLock<String>>> {
        self.answered_by.clone()
    }

    pub async fn next_event(&mut self) -> Option<TokenEvent> {
        self.events.recv().await
    }
}

impl Stream for TokenStream {
    type Item = TokenEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TokenEvent>> {
        self.events.poll_recv(cx)
    }
}

/// Static facts about a loaded model, for `/v1/models` and request validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    pub tier: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("model `{model}` is still loading")]
    Loading { model: String },
    #[error("model `{model}` is not running: {reason}")]
    Unavailable { model: String, reason: String },
    #[error("the request queue of model `{model}` is full ({capacity} waiting)")]
    QueueFull { model: String, capacity: usize },
    #[error(
        "this model's maximum context length is {context} tokens, but the messages take {prompt_tokens} tokens"
    )]
    PromptTooLong { prompt_tokens: u32, context: u32 },
    #[error(
        "this model's maximum context length is {context} tokens, but {requested} tokens were requested \
         ({prompt_tokens} in the messages, {max_tokens} in the completion)",
        requested = u64::from(*prompt_tokens) + u64::from(*max_tokens)
    )]
    ContextLengthExceeded {
        prompt_tokens: u32,
        max_tokens: u32,
        context: u32,
    },
    #[error("could not build the prompt: {0}")]
    Template(String),
    /// A request parameter this backend cannot honour as given (a schema its grammar
    /// compiler refuses, a token id outside its vocabulary): the client's fault, a 400.
    #[error("{message}")]
    InvalidParameter {
        param: &'static str,
        message: String,
    },
    #[error("decoding failed: {0}")]
    Decode(String),
    /// A remote endpoint refused the request as the client's fault (4xx): no other
    /// endpoint would answer it differently.
    #[error("the upstream refused the request ({status}): {message}")]
    UpstreamRejected { status: u16, message: String },
    /// A remote endpoint failed after the reply had started (or sent what is not an
    /// OpenAI stream), so it could not be retried elsewhere.
    #[error("the upstream failed mid-reply: {0}")]
    Upstream(String),
}

/// The narrow boundary between the gateway and a model runtime.
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// Queue a request. Prompt building, tokenization and context checks happen here, on
    /// the caller's thread, so a bad request fails before it takes a queue place.
    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, EngineError>;

    /// Whether it can take requests now.
    fn health(&self) -> Health;

    /// True once the model is loaded and its step loop is running.
    fn is_ready(&self) -> bool {
        self.health() == Health::Ready
    }

    /// The expected time to first token of a request with `prompt_tokens`, from live queue
    /// state and measured speeds.
    fn forecast(&self, prompt_tokens: u32) -> Forecast;

    /// Tokens the templated `messages` take on this model (what `usage.prompt_tokens`
    /// would say), without queueing anything. The router calls it off the model thread.
    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError>;

    /// What a request's prompt and completion must fit in; `None` until the model is loaded.
    fn limits(&self) -> Option<PromptLimits>;

    /// `Ok` when this backend can serve a request with `tools`; else why not.
    fn calls_tools(&self) -> Result<(), String> {
        Err(format!(
            "model `{}` runs in-process and its chat template has no tool support",
            self.info().id
        ))
    }

    /// `Ok` when this backend can generate `n` > 1 choices for one request; else why not.
    fn serves_choices(&self) -> Result<(), String> {
        Ok(())
    }

    /// The remote endpoints behind this backend and their state (none for a local model).
    fn endpoints(&self) -> Vec<EndpointStatus> {
        Vec::new()
    }
}

/// What the budget planner reads from a backend to decide whether it can answer in time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Forecast {
    /// Expected time to the first token; zero while nothing has been measured.
    pub ttft: Duration,
    /// A new request would start at once: a free slot and nobody waiting (local), or an
    /// endpoint with nothing in flight (remote).
    pub starts_at_once: bool,
    /// How long the work now running has gone without finishing (a decode step that
    /// stalls shows here at once).
    pub stalled_for: Duration,
}

/// One remote endpoint as `/ready` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointStatus {
    pub url: String,
    /// `healthy`, `ejected` (circuit open after failures), `probing` (half-open: one trial
    /// request allowed) or `failing_checks` (its health check fails).
    pub state: &'static str,
    pub outstanding: u32,
    /// Smoothed time to first token seen from this endpoint, once measured.
    pub ttft_ms: Option<f64>,
    /// Why it last failed, if it has.
    pub last_error: Option<String>,
}

/// Whether a backend can take requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Loading,
    Ready,
    /// Failed to load, or its model thread ended or panicked: requests go elsewhere.
    Down(String),
}

/// A backend's size limits, for refusing what cannot fit before it is queued anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLimits {
    /// Positions one sequence may use: prompt plus completion.
    pub context: u32,
    /// Bytes of the longest token's text: a prompt of `b` bytes takes at least
    /// `b / max_token_bytes` tokens, which bounds it before any tokenizing.
    pub max_token_bytes: u32,
}

impl PromptLimits {
    /// The fewest tokens `bytes` of text can take.
    pub fn min_tokens(&self, bytes: usize) -> u64 {
        bytes as u64 / u64::from(self.max_token_bytes.max(1))
    }
}
