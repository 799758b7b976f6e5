//! A model served by a fleet of OpenAI-compatible engines (llama-server, vLLM, SGLang,
//! another tiergate) behind the same [`Engine`] trait as the in-process llama.cpp engine,
//! so routing, budgets, caches and metrics apply to it unchanged.
//!
//! - **Picking** ([`endpoint::pick`]): least requests in flight, with prefix affinity
//!   (a conversation's first message keeps it on one endpoint while load allows, so that
//!   endpoint's KV cache is reused).
//! - **Health**: an active check of each endpoint's health path on a schedule, and a
//!   passive one: consecutive failures eject an endpoint (circuit breaker), and after a
//!   wait one trial request decides whether it is back.
//! - **Retries**: an attempt that fails before its first token moves to another
//!   endpoint; after text has reached the client, a failure ends the reply with an error.
//! - **Deadlines**: the budget's watchdog deadline is split, so an endpoint that does not
//!   produce a first token in time is abandoned (its connection closed) while another
//!   still can.
//! - **Cancellation**: a client that leaves drops the token stream; the request task sees
//!   the channel close and drops the upstream response, which closes its connection.

pub mod endpoint;
pub mod upstream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::endpoint::{affinity_key, affinity_rank, Candidate, Endpoint};
use self::upstream::{Attempt, Call};
use crate::chat::ChatMessage;
use crate::config::{ModelConfig, RemoteConfig};
use crate::engine::prompt::Prompter;
use crate::engine::{
    EndpointStatus, Engine, EngineError, Forecast, GenerationRequest, Health, ModelInfo,
    PromptLimits, TokenEvent, TokenStream,
};
use crate::metrics::{EndpointLabels, Metrics, ModelLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// A remote model: its endpoints, the HTTP client they share, and how it counts tokens.
pub struct RemoteEngine {
    fleet: Arc<Fleet>,
}

struct Fleet {
    info: ModelInfo,
    config: RemoteConfig,
    max_tokens_default: u32,
    endpoints: Vec<Arc<Endpoint>>,
    /// One connection pool for every endpoint (keep-alive saves a handshake per request).
    client: reqwest::Client,
    /// The upstream model's vocabulary and template, when `tokenizer` names them.
    prompter: Option<Prompter>,
    /// False until the first round of health checks has ended: `Loading` until then.
    checked: AtomicBool,
    runtime: tokio::runtime::Handle,
    retries: Counter,
    up: Gauge,
}

/// Prompt tokens of `messages` when no tokenizer is configured: about four bytes a token
/// (OpenAI's rule of thumb for English) and a few for each message's template markers.
pub fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u32 {
    let tokens: usize = messages
        .iter()
        .map(|m| m.content.len().div_ceil(4) + 4)
        .sum();
    u32::try_from(tokens + 3).unwrap_or(u32::MAX)
}

/// Loads the vocabulary and template of a remote model's `tokenizer`, if it names one.
pub fn load_tokenizer(model: &ModelConfig) -> anyhow::Result<Option<Prompter>> {
    let Some(path) = model.remote.as_ref().and_then(|r| r.tokenizer.clone()) else {
        return Ok(None);
    };
    let vocab = ModelConfig {
        path,
        ..model.clone()
    };
    Prompter::load_vocab(&vocab)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("model {}: tokenizer: {e}", model.id))
}

impl RemoteEngine {
    /// Builds the fleet and starts its health checks (the returned task; abort it to stop
    /// them). Call inside the tokio runtime.
    pub fn start(
        model: &ModelConfig,
        metrics: &Metrics,
    ) -> anyhow::Result<(Arc<Self>, JoinHandle<()>)> {
        let config = model
            .remote
            .clone()
            .context("not a remote model (it has no endpoints)")?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tcp_nodelay(true)
            // Below the 5 s after which llama-server and uvicorn (vLLM, SGLang) close an
            // idle connection: a request rarely meets a connection closing under it.
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .context("cannot build the HTTP client")?;
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| {
                let labels = EndpointLabels {
                    model: model.id.clone(),
                    tier: model.tier.clone(),
                    endpoint: url.clone(),
                };
                Arc::new(Endpoint::new(
                    url.clone(),
                    &config,
                    metrics.endpoint_metrics(&labels),
                ))
            })
            .collect();
        let labels = ModelLabels {
            model: model.id.clone(),
            tier: model.tier.clone(),
        };
        let fleet = Arc::new(Fleet {
            info: ModelInfo {
                id: model.id.clone(),
                tier: model.tier.clone(),
            },
            prompter: load_tokenizer(model)?,
            max_tokens_default: model.max_tokens_default,
            endpoints,
            client,
            checked: AtomicBool::new(config.health_path.is_empty()),
            runtime: tokio::runtime::Handle::try_current()
                .context("a remote model must be started inside the tokio runtime")?,
            retries: metrics.upstream_retries.get_or_create(&labels).clone(),
            up: metrics.engine_metrics(&labels).up,
            config,
        });
        let checks = fleet.runtime.spawn(fleet.clone().check_health());
        Ok((Arc::new(Self { fleet }), checks))
    }
}

impl Fleet {
    /// Checks every endpoint at once, then again every `health_interval_ms`, forever.
    async fn check_health(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.health_interval_ms);
        // A health check answers in milliseconds; one that takes longer than this is as good
        // as down (and two in a row take the endpoint out).
        let timeout = Duration::from_secs(2);
        loop {
            let checks = self.endpoints.iter().map(|endpoint| async {
                if let Some(url) = &endpoint.health_url {
                    let checked = match self.client.get(url).timeout(timeout).send().await {
                        Ok(r) if r.status().is_success() => Ok(()),
                        Ok(r) => Err(format!("{url} answered {}", r.status())),
                        Err(e) => Err(format!("{url}: {e}")),
                    };
                    endpoint.checked(checked);
                }
                endpoint.publish(Instant::now());
            });
            futures::future::join_all(checks).await;
            self.checked.store(true, Ordering::Release);
            self.up.set(i64::from(self.health() == Health::Ready));
            tokio::time::sleep(interval).await;
        }
    }

    fn health(&self) -> Health {
        if !self.checked.load(Ordering::Acquire) {
            return Health::Loading;
        }
        let now = Instant::now();
        if self.endpoints.iter().any(|e| e.available(now)) {
            return Health::Ready;
        }
        let why: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| {
                let status = e.status(now);
                match status.last_error {
                    Some(error) => format!("{} {}: {error}", status.url, status.state),
                    None => format!("{} {}", status.url, status.state),
                }
            })
            .collect();
        Health::Down(format!("no endpoint takes requests ({})", why.join("; ")))
    }

    /// The endpoints that may take a request now, leaving out those already `tried`.
    fn candidates(&self, tried: &[usize], affinity: Option<u64>) -> Vec<Candidate> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .enumerate()
            .filter(|(index, e)| {
                !tried.contains(index)
                    && e.available(now)
                    && e.outstanding() < self.config.max_outstanding
            })
            .map(|(index, e)| Candidate {
                index,
                outstanding: e.outstanding(),
                predicted_ttft: e.predict_ttft(),
                affinity_rank: affinity.map_or(0, |key| affinity_rank(key, &e.url)),
                has_room: self
                    .config
                    .slots
                    .is_none_or(|slots| e.outstanding() < slots),
            })
            .collect()
    }

    /// Why no endpoint is left to try: all full or overloaded (a load refusal, like a
    /// full local queue), or every one out or failed.
    fn none_left(&self, tried: &[usize], failures: &[String], found_full: bool) -> EngineError {
        let now = Instant::now();
        let untried_full = self.endpoints.iter().enumerate().any(|(index, e)| {
            !tried.contains(&index)
                && e.available(now)
                && e.outstanding() >= self.config.max_outstanding
        });
        if (found_full || untried_full) && failures.is_empty() {
            return EngineError::QueueFull {
                model: self.info.id.clone(),
                capacity: self.config.max_outstanding as usize * self.endpoints.len(),
            };
        }
        self.unavailable(match failures.is_empty() {
            true => "every endpoint is ejected or failing its health check".to_owned(),
            false => format!("every endpoint tried failed: {}", failures.join("; ")),
        })
    }

    fn unavailable(&self, reason: String) -> EngineError {
        EngineError::Unavailable {
            model: self.info.id.clone(),
            reason,
        }
    }

    /// Tries endpoints until one answers, the client leaves, or none is left; every
    /// outcome ends the stream with its last event.
    async fn serve(
        self: Arc<Self>,
        request: GenerationRequest,
        prompt_tokens: u32,
        max_tokens: u32,
        events: mpsc::UnboundedSender<TokenEvent>,
        answered_by: Arc<OnceLock<String>>,
    ) {
        let body = upstream::chat_body(&request, &self.config.upstream_model, max_tokens);
        let affinity = request
            .messages
            .first()
            .map(|m| affinity_key(&m.content, m.role.as_str()));
        let first_token_timeout = Duration::from_millis(self.config.first_token_timeout_ms);
        let on_first_token = |url: &str| {
            let _ = answered_by.set(url.to_owned());
        };
        // Endpoints attempted, or found full when claimed: not picked again.
        let mut tried = Vec::new();
        // Why each attempt failed; an endpoint that was full or said 429 is not a failure.
        let mut failures: Vec<String> = Vec::new();
        let mut found_full = false;
        let mut attempts = 0u32;
        // One resend on a fresh connection per request: a second is a real failure.
        let mut resent = false;
        loop {
            let candidates = self.candidates(&tried, affinity);
            let Some(index) = endpoint::pick(&candidates, affinity.is_some()) else {
                let none_left = self.none_left(&tried, &failures, found_full);
                let _ = events.send(TokenEvent::Failed(none_left));
                return;
            };
            tried.push(index);
            let endpoint = &self.endpoints[index];
            // Another request may have taken its last place (or its trial) meanwhile.
            let Some(mut in_flight) = endpoint.try_begin(self.config.max_outstanding) else {
                found_full = true;
                continue;
            };
            if attempts > 0 {
                self.retries.inc();
            }
            attempts += 1;
            // With another endpoint to go to, this one gets half of what is left of the
            // budget, or twice its own predicted first token when that is more, but never
            // more than three quarters: the next one must still have time to answer. The
            // last one waits until the budget's watchdog gives up on the tier, which
            // drops the stream and so closes the request.
            let now = Instant::now();
            let mut first_token_by = now + first_token_timeout;
            let mut deadline_is_budget = false;
            if let Some(by) = request.first_token_by.filter(|_| candidates.len() > 1) {
                let left = by.saturating_duration_since(now);
                let share = (left / 2)
                    .max(endpoint.predict_ttft() * 2)
                    .min(left * 3 / 4);
                deadline_is_budget = now + share < first_token_by;
                first_token_by = first_token_by.min(now + share);
            }
            let call = Call {
                client: &self.client,
                api_key: self.config.api_key.as_deref(),
                body: body.clone(),
                events: &events,
                first_token_by,
                deadline_is_budget,
                may_resend: !resent,
                idle_timeout: Duration::from_millis(self.config.idle_timeout_ms),
                prompt_tokens,
                on_first_token: &on_first_token,
            };
            match upstream::attempt(call, &mut in_flight).await {
                Attempt::Done | Attempt::ClientGone => return,
                Attempt::Resend(why) => {
                    resent = true;
                    tracing::debug!(model = %self.info.id, endpoint = %endpoint.url, %why,
                        "resending");
                    tried.pop();
                }
                Attempt::Overloaded(why) => {
                    tracing::debug!(model = %self.info.id, endpoint = %endpoint.url, %why,
                        "upstream overloaded: trying another endpoint");
                    found_full = true;
                }
                Attempt::Retry(why) => {
                    tracing::warn!(model = %self.info.id, endpoint = %endpoint.url, %why,
                        "upstream attempt failed before its first token");
                    failures.push(format!("{}: {why}", endpoint.url));
                }
            }
        }
    }

    fn count(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        match &self.prompter {
            Some(prompter) => prompter.count(messages),
            None => Ok(estimate_prompt_tokens(messages)),
        }
    }
}

impl Engine for RemoteEngine {
    fn info(&self) -> &ModelInfo {
        &self.fleet.info
    }

    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, EngineError> {
        if request.n > 1 {
            // The gateway routes around this; it guards a direct caller.
            let why = self.serves_choices().err().unwrap_or_default();
            return Err(EngineError::InvalidParameter {
                param: "n",
                message: format!("`n` > 1 is not supported: {why}"),
            });
        }
        let fleet = &self.fleet;
        let prompt_tokens = fleet.count(&request.messages)?;
        let limits = self.limits();
        if let Some(limits) = limits.filter(|l| prompt_tokens >= l.context) {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                context: limits.context,
            });
        }
        let max_tokens = match (request.max_tokens, limits) {
            (Some(max_tokens), Some(limits))
                if prompt_tokens.saturating_add(max_tokens) > limits.context =>
            {
                return Err(EngineError::ContextLengthExceeded {
                    prompt_tokens,
                    max_tokens,
                    context: limits.context,
                });
            }
            (Some(max_tokens), _) => max_tokens,
            (None, limits) => {
                let room = limits.map_or(u32::MAX, |l| l.context - prompt_tokens);
                fleet
                    .max_tokens_default
                    .min(request.max_tokens_cap.unwrap_or(u32::MAX))
                    .min(room)
            }
        };
        match fleet.health() {
            Health::Ready => {}
            Health::Loading => {
                return Err(EngineError::Loading {
                    model: fleet.info.id.clone(),
                })
            }
            Health::Down(reason) => return Err(fleet.unavailable(reason)),
        }
        if fleet.candidates(&[], None).is_empty() {
            return Err(EngineError::QueueFull {
                model: fleet.info.id.clone(),
                capacity: fleet.config.max_outstanding as usize * fleet.endpoints.len(),
            });
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let answered_by = Arc::new(OnceLock::new());
        fleet.runtime.spawn(fleet.clone().serve(
            request,
            prompt_tokens,
            max_tokens,
            events_tx,
            answered_by.clone(),
        ));
        Ok(TokenStream::remote(prompt_tokens, events_rx, answered_by))
    }

    fn health(&self) -> Health {
        self.fleet.health()
    }

    /// The endpoint the next request would go to: its predicted first token, and whether
    /// it has nothing in flight.
    fn forecast(&self, _prompt_tokens: u32) -> Forecast {
        let candidates = self.fleet.candidates(&[], None);
        let best = endpoint::pick(&candidates, false)
            .and_then(|index| candidates.iter().find(|c| c.index == index));
        match best {
            Some(best) => Forecast {
                ttft: best.predicted_ttft,
                // A free slot when slots are known; else nothing in flight there.
                starts_at_once: best.has_room
                    && (self.fleet.config.slots.is_some() || best.outstanding == 0),
                stalled_for: Duration::ZERO,
            },
            None => Forecast::default(),
        }
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        self.fleet.count(messages)
    }

    /// Known only with both a tokenizer (for exact counts) and a configured context: an
    /// estimate must not refuse a prompt the upstream would take.
    fn limits(&self) -> Option<PromptLimits> {
        let prompter = self.fleet.prompter.as_ref()?;
        Some(PromptLimits {
            context: self.fleet.config.context?,
            max_token_bytes: prompter.max_token_bytes(),
        })
    }

    /// OpenAI-compatible servers take `tools` (llama-server with `--jinja`, vLLM with a
    /// tool parser); one that cannot says so with a 400, passed on to the client.
    fn calls_tools(&self) -> Result<(), String> {
        Ok(())
    }

    fn serves_choices(&self) -> Result<(), String> {
        Err(format!(
            "model `{}` is remote and its relay reads one choice",
            self.info().id
        ))
    }

    fn endpoints(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.fleet.endpoints.iter().map(|e| e.status(now)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_grow_with_the_text_and_the_messages() {
        let one = estimate_prompt_tokens(&[ChatMessage::user("x".repeat(400))]);
        assert_eq!(one, 100 + 4 + 3);
        let two = estimate_prompt_tokens(&[
            ChatMessage::user("x".repeat(400)),
            ChatMessage::user("y".repeat(4)),
        ]);
        assert_eq!(two, one + 1 + 4);
    }
}
