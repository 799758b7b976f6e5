//! The domain types every layer shares: a conversation's messages, its sampling settings and
//! a checked chat request. The HTTP layer parses JSON into these; the gateway, router, cache
//! and engines read them. Nothing here knows about HTTP or llama.cpp.

use std::sync::Arc;

/// Who wrote a chat message. `developer` (OpenAI's newer name) is folded into `System`
/// by the API layer before it gets here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, sent back after the assistant called it (remote tiers only).
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
}

/// The size of a conversation for deciding how to handle it: the messages' text, and for
/// each message the template markup around it, so that many empty messages still count.
pub fn message_bytes(messages: &[ChatMessage]) -> usize {
    messages.iter().map(|m| m.content.len() + 16).sum()
}

/// Appends `text` to a memo key, length-prefixed so that no two sequences of fields give
/// the same key; `None` appends a marker no length-prefixed text starts with.
pub fn push_key_field(key: &mut String, text: Option<&str>) {
    match text {
        Some(text) => {
            key.push_str(&text.len().to_string());
            key.push(':');
            key.push_str(text);
        }
        None => key.push('-'),
    }
}

/// Appends every message's role and text to a memo key ([`push_key_field`]).
pub fn push_messages_key(key: &mut String, messages: &[ChatMessage]) {
    // Destructured: a field a template or a rule reads must not be left out of a key.
    for ChatMessage { role, content } in messages {
        push_key_field(key, Some(role.as_str()));
        push_key_field(key, Some(content));
    }
}

/// Per-sequence sampling settings, already validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables the top-k cut.
    pub top_k: u32,
    /// `None` draws a fresh seed per request.
    pub seed: Option<u32>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `logit_bias`: added to a token's logit before any other sampling step, sorted by
    /// token id, each bias in -100..=100 (-100 bans the token, as in OpenAI's API).
    pub logit_bias: Vec<(i32, f32)>,
}

/// Temperatures below this sample greedily. Dividing logits by a temperature near zero
/// overflows to infinities and NaNs (1e-38 does), and anything this small picks the top
/// token anyway.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-3;

impl SamplingParams {
    /// Whether sampling reduces to taking the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW_TEMPERATURE
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            // llama.cpp's default: it also keeps sampling cheap on a 262k vocabulary.
            top_k: 40,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// `response_format`: the shape a reply must take. Local tiers enforce it while sampling
/// (a grammar compiled from the schema); remote tiers get it as the client sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum ReplyFormat {
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against `schema`.
    JsonSchema {
        name: String,
        /// The schema as compact JSON in the client's key order: llama.cpp's grammar puts
        /// properties in that order, and the grammar cache and reply cache key on it.
        schema: Arc<str>,
        strict: Option<bool>,
    },
}

impl ReplyFormat {
    /// The JSON Schema a local tier enforces; `None` for free text.
    pub fn schema(&self) -> Option<&str> {
        match self {
            ReplyFormat::Text => None,
            ReplyFormat::JsonObject => Some(r#"{"type":"object"}"#),
            ReplyFormat::JsonSchema { schema, .. } => Some(schema),
        }
    }
}

/// Tool calling as the client sent it: `tools`, `tool_choice`, `parallel_tool_calls`, and
/// the tool parts of its messages. Passed to remote tiers unchanged, never interpreted
/// here (JSON kept as serialized text).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ToolSpec {
    /// The `tools` array.
    pub tools: Option<Arc<str>>,
    pub tool_choice: Option<Arc<str>>,
    pub parallel_tool_calls: Option<bool>,
    /// By message index: an assistant message's `tool_calls` array.
    pub calls: Vec<(usize, Arc<str>)>,
    /// By message index: a tool message's `tool_call_id`.
    pub call_ids: Vec<(usize, String)>,
}

impl ToolSpec {
    /// The `tool_calls` of message `index`, if it made any.
    pub fn calls_of(&self, index: usize) -> Option<&str> {
        self.calls
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, calls)| &**calls)
    }

    /// The `tool_call_id` of message `index`, if it is a tool's result.
    pub fn call_id_of(&self, index: usize) -> Option<&str> {
        self.call_ids
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, id)| id.as_str())
    }
}

/// A checked chat request: what the caller asked for, before routing decides anything.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// `auto`, a tier name, or a model id.
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// As the request set it; `None` leaves it to the route's cap and the model's default.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// Never sample end-of-generation tokens, so the completion runs to `max_tokens`
    /// (llama.cpp's server extension; load tests use it for fixed-length outputs).
    pub ignore_eos: bool,
    pub format: ReplyFormat,
    /// `Some(k)`: report each sampled token's log probability and the `k` (0 to 20) most
    /// likely alternatives (`logprobs` with `top_logprobs`).
    pub logprobs: Option<u8>,
    /// Tool calling: only tiers that can call tools serve such a request.
    pub tools: Option<Arc<ToolSpec>>,
    /// Choices to generate (`n`), at least 1.
    pub n: u32,
}

impl ChatRequest {
    /// A request with one user message and the defaults for everything else.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            model: "auto".into(),
            stream: false,
            include_usage: false,
            messages: vec![ChatMessage::user(content)],
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            format: ReplyFormat::Text,
            logprobs: None,
            tools: None,
            n: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_too_small_to_divide_by_sample_greedily() {
        let at = |temperature| SamplingParams {
            temperature,
            ..SamplingParams::default()
        };
        assert!(at(0.0).is_greedy());
        assert!(at(1e-38).is_greedy(), "1e-38 overflows logits to NaN");
        assert!(!at(0.01).is_greedy());
    }
}
