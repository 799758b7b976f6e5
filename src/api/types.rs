//! OpenAI chat-completion wire types: what frontends send, checked into a
//! [`ChatRequest`], and what goes back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::chat::{ChatMessage, ChatRequest, ReplyFormat, Role, SamplingParams, ToolSpec};
use crate::engine::logprobs::TokenLogprob;
use crate::engine::Usage;

/// The most stop strings one request may carry; each is checked after every token.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string accepted, in bytes (stop strings are markers, not documents).
pub const MAX_STOP_BYTES: usize = 256;

/// The request body as frontends send it. Unknown fields are ignored; fields that name an
/// OpenAI feature tiergate cannot honour are parsed only so the error can name them.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<RequestMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// OpenAI's newer name for `max_tokens`; it wins when both are set.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not OpenAI, but llama.cpp's server and vLLM accept it.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// llama.cpp's server extension: generate to `max_tokens` whatever the model wants.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Accepted for compatibility; recorded nowhere yet.
    #[serde(default)]
    pub user: Option<String>,

    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,

    /// Served by tiers that can call tools (remote ones); passed on unchanged.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,

    #[serde(default)]
    pub n: Option<i64>,

    // Parameters tiergate cannot honour: a 400 naming them, never silently ignored.
    #[serde(default)]
    pub functions: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// The most `logit_bias` entries one request may carry (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// The most choices one request may ask for; each takes a slot of the model.
pub const MAX_CHOICES: i64 = 16;
/// The most alternatives `top_logprobs` may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug)]
pub enum MessageContent {
    Text(String),
    /// Open WebUI and the OpenAI SDKs send `[{"type": "text", "text": "..."}]`, sometimes with
    /// extra keys (which are ignored).
    Parts(Vec<ContentPart>),
}

/// A string or a list of parts, told apart by the JSON type. Not `#[serde(untagged)]`,
/// which buffers every message's content into an intermediate value before trying each
/// variant: that was a sixth of parsing a short chat request.
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> serde::de::Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                parts: A,
            ) -> Result<Self::Value, A::Error> {
                let parts =
                    Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(parts))?;
                Ok(MessageContent::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// Parses and validates a request body; every error names the parameter at fault.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    // Valid bodies parse without tracking the path, which costs a third of the parse; only
    // a body that fails is parsed again to say where.
    if let Ok(raw) = serde_json::from_slice::<ChatCompletionRequest>(body) {
        return raw.validate();
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let raw: ChatCompletionRequest =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_data() && path != "." {
                ApiError::invalid_request(format!("invalid `{path}`: {inner}")).with_param(path)
            } else if inner.is_data() {
                ApiError::invalid_request(format!("invalid request body: {inner}"))
            } else {
                ApiError::invalid_request(format!("the request body is not valid JSON: {inner}"))
            }
        })?;
    // What follows the object (the fast path refused the body for it).
    deserializer.end().map_err(|inner| {
        ApiError::invalid_request(format!("the request body is not valid JSON: {inner}"))
    })?;
    raw.validate()
}

impl ChatCompletionRequest {
    fn validate(self) -> Result<ChatRequest, ApiError> {
        self.reject_unsupported()?;

        if self.messages.is_empty() {
            return Err(
                ApiError::invalid_request("`messages` must contain at least one message")
                    .with_param("messages"),
            );
        }
        let mut tools = ToolSpec::default();
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_chat_message(i, &mut tools))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(list) = self.tools.filter(|list| !list.is_empty()) {
            if let Some(at) = list.iter().position(|tool| !tool.is_object()) {
                return Err(ApiError::invalid_request(format!(
                    "`tools[{at}]` must be an object such as {{\"type\": \"function\", \"function\": {{...}}}}"
                ))
                .with_param(format!("tools[{at}]")));
            }
            tools.tools = Some(Value::Array(list).to_string().into());
        }
        let asks_for_tools = tools.tools.is_some();
        if self.tool_choice.is_some() && !asks_for_tools {
            return Err(ApiError::invalid_request(
                "`tool_choice` is only allowed when `tools` are given",
            )
            .with_param("tool_choice"));
        }
        tools.tool_choice = self.tool_choice.map(|choice| choice.to_string().into());
        tools.parallel_tool_calls = self.parallel_tool_calls.filter(|_| asks_for_tools);
        let tools = (tools != ToolSpec::default()).then(|| Arc::new(tools));

        let max_tokens = match self
            .max_completion_tokens
            .map(|v| ("max_completion_tokens", v))
            .or(self.max_tokens.map(|v| ("max_tokens", v)))
        {
            Some((param, value)) if value < 1 => {
                return Err(ApiError::invalid_request(format!(
                    "`{param}` must be at least 1, got {value}"
                ))
                .with_param(param));
            }
            Some((param, value)) => Some(u32::try_from(value).map_err(|_| {
                ApiError::invalid_request(format!("`{param}` is too large: {value}"))
                    .with_param(param)
            })?),
            None => None,
        };

        let defaults = SamplingParams::default();
        let temperature = in_range("temperature", self.temperature, 0.0, 2.0)?
            .unwrap_or(defaults.temperature as f64);
        let top_p =
            in_range("top_p", self.top_p, f64::MIN_POSITIVE, 1.0)?.unwrap_or(defaults.top_p as f64);
        let presence_penalty =
            in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
        let frequency_penalty =
            in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
        let top_k = match self.top_k {
            Some(k) if k < 0 => {
                return Err(ApiError::invalid_request(format!(
                    "`top_k` must be 0 (off) or more, got {k}"
                ))
                .with_param("top_k"))
            }
            Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
            None => defaults.top_k,
        };
        let sampling = SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed: self.seed.map(fold_seed),
            presence_penalty: presence_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
        };
        let format = reply_format(self.response_format)?;
        let ignore_eos = self.ignore_eos.unwrap_or(false);
        if ignore_eos && format != ReplyFormat::Text {
            // A finished JSON value allows only end-of-generation, which ignore_eos bans.
            return Err(ApiError::invalid_request(
                "`ignore_eos` cannot be combined with a JSON `response_format`: a complete reply must end",
            )
            .with_param("ignore_eos"));
        }
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_CHOICES).contains(&n) => n as u32,
            Some(n) => {
                return Err(ApiError::invalid_request(format!(
                    "`n` must be between 1 and {MAX_CHOICES}, got {n}"
                ))
                .with_param("n"))
            }
        };
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
                return Err(ApiError::invalid_request(format!(
                    "`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"
                ))
                .with_param("top_logprobs"))
            }
            (Some(true), k) => Some(k.unwrap_or(0) as u8),
            (_, Some(k)) if k > 0 => {
                return Err(ApiError::invalid_request(
                    "`top_logprobs` needs `logprobs` set to true",
                )
                .with_param("top_logprobs"))
            }
            _ => None,
        };

        let stop = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(list)) => list,
        };
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid_request(format!(
                "each `stop` string may be at most {MAX_STOP_BYTES} bytes, got one of {}",
                long.len()
            ))
            .with_param("stop"));
        }
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_request(format!(
                "`stop` may hold at most {MAX_STOP_STRINGS} strings, got {}",
                stop.len()
            ))
            .with_param("stop"));
        }

        Ok(ChatRequest {
            model: self.model.unwrap_or_else(|| "auto".into()),
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            messages,
            sampling,
            max_tokens,
            stop,
            ignore_eos,
            format,
            logprobs,
            tools,
            n,
        })
    }

    fn reject_unsupported(&self) -> Result<(), ApiError> {
        if self.functions.as_ref().is_some_and(|f| !f.is_empty()) {
            return Err(ApiError::unsupported_parameter(
                "functions",
                "function calling is not implemented",
            ));
        }
        Ok(())
    }
}

impl RequestMessage {
    /// The message, with its tool parts (if any) recorded in `tools`.
    fn into_chat_message(
        self,
        index: usize,
        tools: &mut ToolSpec,
    ) -> Result<ChatMessage, ApiError> {
        let role = match self.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => {
                return Err(ApiError::unsupported_parameter(
                    &format!("messages[{index}].role"),
                    "the legacy `function` role is not accepted; send `tool` messages",
                ))
            }
            other => {
                return Err(ApiError::invalid_request(format!(
                    "`messages[{index}].role` must be one of system, developer, user, assistant, tool; got `{other}`"
                ))
                .with_param(format!("messages[{index}].role")))
            }
        };
        if let Some(calls) = self.tool_calls.filter(|c| !c.is_empty()) {
            if role != Role::Assistant {
                return Err(ApiError::invalid_request(format!(
                    "only assistant messages carry `tool_calls`, not `messages[{index}]`"
                ))
                .with_param(format!("messages[{index}].tool_calls")));
            }
            tools
                .calls
                .push((index, Value::Array(calls).to_string().into()));
        }
        match (role, self.tool_call_id) {
            (Role::Tool, Some(id)) => tools.call_ids.push((index, id)),
            (Role::Tool, None) => {
                return Err(ApiError::invalid_request(format!(
                    "`messages[{index}].tool_call_id` is required for a tool message"
                ))
                .with_param(format!("messages[{index}].tool_call_id")))
            }
            _ => {}
        }
        let content = match self.content {
            // An assistant message that only calls tools has no content.
            None if tools.calls_of(index).is_some() => String::new(),
            None => {
                return Err(ApiError::invalid_request(format!(
                    "`messages[{index}].content` is required"
                ))
                .with_param(format!("messages[{index}].content")))
            }
            Some(MessageContent::Text(text)) => text,
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (p, part) in parts.into_iter().enumerate() {
                    let param = format!("messages[{index}].content[{p}]");
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        ("text", None) => {
                            return Err(ApiError::invalid_request(format!(
                                "`{param}.text` is required"
                            ))
                            .with_param(format!("{param}.text")))
                        }
                        (other, _) => {
                            return Err(ApiError::unsupported_parameter(
                                &param,
                                &format!("only text content parts are accepted, not `{other}`"),
                            ))
                        }
                    }
                }
                text
            }
        };
        Ok(ChatMessage { role, content })
    }
}

fn in_range(param: &str, value: Option<f64>, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !(min..=max).contains(&v) || v.is_nan() => {
            let low = if min == f64::MIN_POSITIVE {
                "above 0".to_owned()
            } else {
                format!("at least {min}")
            };
            Err(ApiError::invalid_request(format!(
                "`{param}` must be {low} and at most {max}, got {v}"
            ))
            .with_param(param))
        }
        other => Ok(other),
    }
}

/// `logit_bias` as OpenAI takes it: token ids (as strings) to biases in -100..=100.
/// Whether each id exists is checked by the backend that serves the request.
fn logit_bias(map: Option<&serde_json::Map<String, Value>>) -> Result<Vec<(i32, f32)>, ApiError> {
    let Some(map) = map else {
        return Ok(Vec::new());
    };
    let invalid = |message: String| ApiError::invalid_request(message).with_param("logit_bias");
    if map.len() > MAX_LOGIT_BIAS {
        return Err(invalid(format!(
            "`logit_bias` may hold at most {MAX_LOGIT_BIAS} tokens, got {}",
            map.len()
        )));
    }
    let mut biases = Vec::with_capacity(map.len());
    for (token, bias) in map {
        let token_id = token
            .parse::<i32>()
            .ok()
            .filter(|id| *id >= 0)
            .ok_or_else(|| {
                invalid(format!(
                    "`logit_bias` keys must be token ids (non-negative integers), got `{token}`"
                ))
            })?;
        let bias = bias
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                invalid(format!(
                    "`logit_bias[{token}]` must be a number from -100 to 100, got {bias}"
                ))
            })?;
        biases.push((token_id, bias as f32));
    }
    biases.sort_by_key(|&(token, _)| token);
    // `"5"` and `"05"` name one token; llama.cpp would add both biases.
    if let Some(pair) = biases.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(invalid(format!(
            "`logit_bias` names token {} more than once",
            pair[0].0
        )));
    }
    Ok(biases)
}

/// `response_format`: `text`, `json_object`, or `json_schema` with a schema that is
/// itself valid JSON Schema (checked here, so every tier refuses a broken one alike).
fn reply_format(format: Option<ResponseFormat>) -> Result<ReplyFormat, ApiError> {
    let Some(format) = format else {
        return Ok(ReplyFormat::Text);
    };
    let invalid =
        |message: String| ApiError::invalid_request(message).with_param("response_format");
    match format.kind.as_str() {
        "text" => Ok(ReplyFormat::Text),
        "json_object" => Ok(ReplyFormat::JsonObject),
        "json_schema" => {
            let spec = format.json_schema.ok_or_else(|| {
                invalid("`response_format.json_schema` is required for type `json_schema`".into())
            })?;
            let schema = spec.schema.ok_or_else(|| {
                invalid("`response_format.json_schema.schema` is required".into())
            })?;
            if !schema.is_object() {
                return Err(invalid(format!(
                    "`response_format.json_schema.schema` must be a JSON object, got {schema}"
                )));
            }
            if let Err(err) = jsonschema::validator_for(&schema) {
                return Err(invalid(format!(
                    "`response_format.json_schema.schema` is not a valid JSON Schema: {err}"
                )));
            }
            Ok(ReplyFormat::JsonSchema {
                name: spec.name.unwrap_or_else(|| "response".into()),
                schema: schema.to_string().into(),
                strict: spec.strict,
            })
        }
        other => Err(invalid(format!(
            "`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"
        ))),
    }
}

/// OpenAI seeds are 64-bit; llama.cpp's are 32-bit, and u32::MAX means "random".
fn fold_seed(seed: i64) -> u32 {
    let bits = seed as u64;
    let folded = (bits ^ (bits >> 32)) as u32;
    folded.min(u32::MAX - 1)
}

// ---- responses ----

#[derive(Debug, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// OpenAI's report of prompt tokens served from a cache (here: the prefix cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens(),
            prompt_tokens_details: usage
                .cached_prompt_tokens
                .map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }
    }
}

/// `chat.completion.chunk`, one per SSE event.
#[derive(Debug, Serialize)]
pub struct ChunkBody<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    /// One choice or none (the usage chunk), written as a list: a chunk never carries
    /// several, and a list would cost an allocation per chunk.
    #[serde(serialize_with = "zero_or_one")]
    pub choices: Option<ChunkChoice<'a>>,
    /// Present (as null until the last chunk) only when the client asked for usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
    /// tiergate's own note on the last chunk (OpenAI clients ignore unknown fields).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiergate: Option<ChunkNote>,
}

fn zero_or_one<S: serde::Serializer, T: Serialize>(
    item: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(item)
}

#[derive(Debug, Serialize)]
pub struct ChunkNote {
    /// `total`: the reply's total budget ran out, so it ended with `length`.
    pub budget_cut: &'static str,
    pub total_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<LogprobsBody<'a>>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<&'a [Value]>,
}

/// A choice's `logprobs`: one entry per token of its content.
#[derive(Debug, Serialize)]
pub struct LogprobsBody<'a> {
    pub content: &'a [TokenLogprob],
}

/// `chat.completion`, the non-streaming reply.
#[derive(Debug, Serialize)]
pub struct CompletionBody<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<CompletionChoice<'a>>,
    pub usage: UsageBody,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<LogprobsBody<'a>>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    /// `null` when the reply is only tool calls, as OpenAI sends it.
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: &'a [Value],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat_request(body.as_bytes())
    }

    #[test]
    fn open_webui_content_parts_with_extra_keys_are_joined() {
        let req = parse(
            r#"{"model":"auto","messages":[{"role":"user","content":[{"type":"text","text":"a","cache_control":{}},{"type":"text","text":"b"}]}]}"#,
        )
        .expect("valid");
        assert_eq!(req.messages[0].content, "ab");
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let req = parse(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7}"#).expect("valid");
        assert_eq!(req.max_tokens, Some(7));
        assert_eq!(req.model, "auto");
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let one =
            parse(r#"{"messages":[{"role":"user","content":"x"}],"stop":"END"}"#).expect("valid");
        assert_eq!(one.stop, vec!["END"]);
        let many = parse(r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b"]}"#)
            .expect("valid");
        assert_eq!(many.stop, vec!["a", "b"]);
    }

    #[test]
    fn a_stop_string_longer_than_the_cap_is_a_400_naming_stop() {
        let long = "s".repeat(MAX_STOP_BYTES + 1);
        let err = parse(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"stop":["ok","{long}"]}}"#
        ))
        .expect_err("too long");
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("stop"));
        let at_cap = "s".repeat(MAX_STOP_BYTES);
        assert!(parse(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"stop":"{at_cap}"}}"#
        ))
        .is_ok());
    }

    #[test]
    fn developer_role_is_a_system_message() {
        let req = parse(r#"{"messages":[{"role":"developer","content":"be brief"},{"role":"user","content":"x"}]}"#).expect("valid");
        assert_eq!(req.messages[0].role, Role::System);
    }

    #[test]
    fn unsupported_parameters_are_named() {
        for (field, param) in [
            (r#""n":0"#, "n"),
            (r#""n":17"#, "n"),
            (r#""functions":[{"name":"f"}]"#, "functions"),
        ] {
            let err = parse(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#
            ))
            .expect_err(field);
            assert_eq!(err.status, 400);
            assert_eq!(err.param.as_deref(), Some(param), "{field}");
        }
    }

    #[test]
    fn tool_parts_of_messages_are_kept_by_index_and_the_legacy_role_is_named() {
        let req = parse(
            r#"{"messages":[{"role":"user","content":"x"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"}],
               "tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"auto"}"#,
        )
        .expect("valid");
        let tools = req.tools.expect("tool spec");
        assert!(tools.calls_of(1).is_some_and(|c| c.contains("\"c1\"")));
        assert_eq!(tools.call_id_of(2), Some("c1"));
        assert_eq!(tools.tool_choice.as_deref(), Some("\"auto\""));
        assert_eq!(req.messages[2].role, Role::Tool);
        assert_eq!(req.messages[1].content, "");
        let err = parse(r#"{"messages":[{"role":"function","name":"f","content":"x"}]}"#)
            .expect_err("legacy role");
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = parse(r#"{"messages":[{"role":"tool","content":"x"}]}"#).expect_err("no id");
        assert_eq!(err.param.as_deref(), Some("messages[0].tool_call_id"));
    }

    #[test]
    fn formats_biases_and_logprobs_parse_into_the_request() {
        let req = parse(
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":3,
                "logit_bias":{"50":-100,"7":2.5},
                "response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object","required":["b","a"]}}}}"#,
        )
        .expect("valid");
        assert_eq!(req.logprobs, Some(3));
        assert_eq!(req.sampling.logit_bias, vec![(7, 2.5), (50, -100.0)]);
        let ReplyFormat::JsonSchema { name, schema, .. } = &req.format else {
            panic!("{:?}", req.format)
        };
        assert_eq!(name, "p");
        // The client's key order, which the grammar follows; its spacing dropped.
        assert_eq!(&**schema, r#"{"type":"object","required":["b","a"]}"#);
        let object = parse(
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"},"logprobs":true}"#,
        )
        .expect("valid");
        assert_eq!(object.format, ReplyFormat::JsonObject);
        assert_eq!(object.logprobs, Some(0));
    }

    #[test]
    fn harmless_openai_fields_and_unknown_fields_are_accepted() {
        let req = parse(
            r#"{"messages":[{"role":"user","content":"x"}],"n":1,"tools":[],"logprobs":false,"response_format":{"type":"text"},"user":"u","seed":-1,"parallel_tool_calls":true,"whatever":{}}"#,
        );
        assert!(req.is_ok(), "{req:?}");
    }

    #[test]
    fn wrong_types_name_the_parameter() {
        let err = parse(r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#)
            .expect_err("type");
        assert_eq!(err.param.as_deref(), Some("temperature"));
        let err = parse(r#"{"messages":"hello"}"#).expect_err("type");
        assert_eq!(err.param.as_deref(), Some("messages"));
    }

    #[test]
    fn content_is_a_string_or_a_list_of_parts_and_nothing_else() {
        let content = |json: &str| {
            parse(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}},{{"role":"assistant","content":{json}}},{{"role":"user","content":"y"}}]}}"#
            ))
        };
        let texts = |req: ChatRequest| -> Vec<String> {
            req.messages.into_iter().map(|m| m.content).collect()
        };
        assert_eq!(
            texts(content(r#""a \"quoted\" \u00e9""#).expect("string")),
            ["x", "a \"quoted\" é", "y"]
        );
        assert_eq!(
            texts(
                content(r#"[{"type":"text","text":"p"},{"type":"text","text":"q"}]"#)
                    .expect("parts")
            ),
            ["x", "pq", "y"]
        );
        // Null is no content, which a message without tool calls must have.
        let err = content("null").expect_err("null");
        assert!(err.message.contains("is required"), "{}", err.message);
        for wrong in ["7", "true", r#"{"type":"text","text":"p"}"#, r#"[7]"#] {
            let err = content(wrong).expect_err(wrong);
            assert_eq!(err.status, 400, "{wrong}");
            // A wrong part is named by its index (untagged named only the content).
            let param = err.param.unwrap_or_default();
            assert!(param.starts_with("messages[1].content"), "{wrong}: {param}");
        }
        let err = content("7").expect_err("a number");
        assert!(
            err.message
                .contains("a string or an array of content parts"),
            "{}",
            err.message
        );
    }

    #[test]
    fn malformed_json_is_a_400_without_param() {
        let err = parse(r#"{"messages": ["#).expect_err("syntax");
        assert_eq!(err.status, 400);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        // A second value after the request: refused, though the first one parses.
        let err =
            parse(r#"{"messages":[{"role":"user","content":"x"}]} {}"#).expect_err("trailing data");
        assert_eq!(err.status, 400);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
    }

    #[test]
    fn out_of_range_sampling_values_are_rejected() {
        for (field, param) in [
            (r#""temperature":2.5"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""top_p":1.5"#, "top_p"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""presence_penalty":3"#, "presence_penalty"),
            (r#""top_k":-1"#, "top_k"),
        ] {
            let err = parse(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#
            ))
            .expect_err(field);
            assert_eq!(err.param.as_deref(), Some(param), "{field}");
        }
    }

    #[test]
    fn empty_messages_and_unknown_roles_are_rejected() {
        let err = parse(r#"{"messages":[]}"#).expect_err("empty");
        assert_eq!(err.param.as_deref(), Some("messages"));
        let err = parse(r#"{"messages":[{"role":"wizard","content":"x"}]}"#).expect_err("role");
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = parse(r#"{"model":"auto"}"#).expect_err("missing");
        assert!(err.message.contains("messages"), "{}", err.message);
    }

    #[test]
    fn seeds_fold_to_32_bits_without_hitting_the_random_marker() {
        assert_eq!(fold_seed(42), 42);
        assert_ne!(fold_seed(-1), u32::MAX);
        assert_eq!(fold_seed(-1), fold_seed(-1));
    }

    #[test]
    fn chunk_serializes_usage_null_only_when_asked() {
        let chunk = ChunkBody {
            id: "c",
            object: "chat.completion.chunk",
            created: 1,
            model: "m",
            choices: None,
            usage: Some(None),
            tiergate: None,
        };
        let json = serde_json::to_string(&chunk).expect("json");
        assert!(json.contains(r#""usage":null"#), "{json}");
        assert!(json.contains(r#""choices":[]"#), "{json}");
    }
}
