//! The request path below HTTP, as one service: admission → route → token quota → budget
//! plan → backend. The HTTP handler parses a body, calls [`Gateway::serve`] and renders the
//! [`Served`] reply as SSE or JSON; `/v1/route` and `tiergate route` call [`explain`], the
//! same routing step without generating.
//!
//! ```text
//! serve(caller, request)
//!   admission (key, request quota) ─► Tiers::resolve(model) ─► Policy::route ─► token quota
//!   ─► budget::Planner::acquire (cache, prediction, watchdog, degrade) ─► Served { reply }
//! ```
//!
//! A request's outcome (status, finish reason, TTFT, tokens) is recorded in one place,
//! [`Outcome`], however the request ends: refused, failed, finished, cut by its budget or
//! left by its client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::admission::{Admission, Denied};
use crate::budget::{
    cpu_bound, unfinished, Acquired, Attempt, BudgetError, CacheUse, Calibration, Deadlines,
    Degradation, Planner, Source,
};
use crate::cache::ReplyCache;
use crate::chat::{message_bytes, ChatMessage, ChatRequest, Role};
use crate::embed::Embedding;
use crate::engine::{
    logprobs::TokenLogprob, EngineError, FinishReason, GenerationRequest, StageTimings, TokenEvent,
    TokenStream, Usage,
};
use crate::metrics::{Metrics, ModelLabels, ReasonLabels, TierLabels};
use crate::router::{
    route_key, CacheMode, Caller, Explanation, Features, Policy, PolicyStore, Route, TokenCounter,
};
use crate::telemetry::access::{self, AccessLine};
use crate::tiers::{Pin, Tiers, TooLarge, UnknownModel};

/// Everything a request may be refused or failed with before its reply starts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GatewayError {
    #[error("{0:?}")]
    Denied(Denied),
    #[error(transparent)]
    UnknownModel(#[from] UnknownModel),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// The policy named a tier no backend serves (policies are validated against the
    /// configured tiers, so this is a bug).
    #[error("the policy chose tier `{0}`, which no model serves")]
    NoBackend(String),
}

impl From<EngineError> for GatewayError {
    fn from(err: EngineError) -> Self {
        GatewayError::Budget(BudgetError::Engine(err))
    }
}

impl GatewayError {
    /// The HTTP status this error answers with: the one mapping both the HTTP layer and
    /// the request counter use.
    pub fn http_status(&self) -> u16 {
        match self {
            GatewayError::Denied(Denied::MissingKey | Denied::UnknownKey) => 401,
            GatewayError::Denied(_) => 429,
            GatewayError::UnknownModel(_) => 404,
            GatewayError::TooLarge(_) => 400,
            GatewayError::Budget(BudgetError::Exhausted { .. }) => 503,
            GatewayError::Budget(BudgetError::Engine(err)) => engine_status(err),
            GatewayError::NoBackend(_) => 500,
        }
    }
}

/// Client errors are 400; a model not serving now is 503; anything else went wrong here.
pub fn engine_status(err: &EngineError) -> u16 {
    match err {
        EngineError::Loading { .. }
        | EngineError::Unavailable { .. }
        | EngineError::QueueFull { .. } => 503,
        EngineError::PromptTooLong { .. }
        | EngineError::ContextLengthExceeded { .. }
        | EngineError::Template(_)
        | EngineError::InvalidParameter { .. } => 400,
        // 400, 413 or 422 from the upstream: the client's to fix, passed on as it came.
        EngineError::UpstreamRejected { status, .. } => *status,
        EngineError::Decode(_) => 500,
        EngineError::Upstream(_) => 502,
    }
}

/// How long a request waits for its embedding before it goes on without one.
const EMBED_WAIT: Duration = Duration::from_millis(1000);

/// A caller whose key and request quota were checked ([`Gateway::admit`]), with its tenant.
#[derive(Debug, Clone)]
pub struct Admitted(Caller);

/// What [`Gateway::new`] is built from.
pub struct GatewayParts {
    pub tiers: Tiers,
    pub policies: Arc<PolicyStore>,
    pub admission: Admission,
    pub cache: Arc<ReplyCache>,
    pub metrics: Arc<Metrics>,
}

pub struct Gateway {
    /// Predicted against observed TTFT per tier, kept for the life of the process.
    calibration: Calibration,
    tiers: Tiers,
    policies: Arc<PolicyStore>,
    admission: Admission,
    cache: Arc<ReplyCache>,
    metrics: Arc<Metrics>,
}

/// A routing decision with what it was made from, for `/v1/route` and `tiergate route`.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    #[serde(flatten)]
    pub explanation: Explanation,
    /// The model that would answer (before any degradation).
    pub model: String,
}

/// How `request` would be routed for `caller`, with every rule tried: the same resolution,
/// features and token counts as [`Gateway::serve`] uses. `meaning` is the embedding of the
/// last user message, when the policy has `similar_to` rules.
pub fn explain(
    tiers: &Tiers,
    policy: &Policy,
    caller: Caller,
    request: &ChatRequest,
    meaning: Option<&[f32]>,
) -> Result<Explained, GatewayError> {
    let pin = tiers.resolve(&request.model)?;
    // A pin the policy ignores must not choose the tokenizer either.
    let pin = pin.filter(|_| policy.allow_pinning);
    let tokens = tiers.counter(&request.messages, pin.as_ref());
    let mut features = Features::extract(&request.messages, request.max_tokens, caller);
    features.similar = meaning.and_then(|vector| policy.similar(vector));
    if request.tools.is_some() || request.n > 1 {
        features.unservable_tiers = tiers.unable_to_serve(request.tools.is_some(), request.n);
    }
    let mut explanation = policy.explain(&features, &tokens, pin.as_ref().map(|p| p.tier.as_str()));
    explanation.route = route_around(tiers, explanation.route, &features.unservable_tiers);
    let model = backend_id(tiers, &explanation.route, pin.as_ref())?;
    Ok(Explained { explanation, model })
}

/// A route to a tier that cannot serve the request at all (tools on a tier that cannot
/// call them) moves to the nearest tier that can, unless the request pinned its tier:
/// then the budget planner's 400 says why.
fn route_around(tiers: &Tiers, route: Route, unservable: &BTreeMap<String, String>) -> Route {
    if route.pinned || !unservable.contains_key(&route.tier) {
        return route;
    }
    match tiers.nearest_able(&route.tier, unservable) {
        Some(tier) => Route { tier, ..route },
        None => route,
    }
}

fn backend_id(tiers: &Tiers, route: &Route, pin: Option<&Pin>) -> Result<String, GatewayError> {
    tiers
        .backend(&route.tier, pinned_model(route, pin))
        .map(|b| b.info().id.clone())
        .ok_or_else(|| GatewayError::NoBackend(route.tier.clone()))
}

/// The model a pinned route must use, if the request named one.
fn pinned_model<'a>(route: &Route, pin: Option<&'a Pin>) -> Option<&'a str> {
    pin.filter(|_| route.pinned)
        .and_then(|p| p.model.as_deref())
}

impl Gateway {
    pub fn new(parts: GatewayParts) -> Self {
        let GatewayParts {
            tiers,
            policies,
            admission,
            cache,
            metrics,
        } = parts;
        Self {
            calibration: Calibration::default(),
            tiers,
            policies,
            admission,
            cache,
            metrics,
        }
    }

    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn cache(&self) -> &Arc<ReplyCache> {
        &self.cache
    }

    /// The policy in force now; a request keeps it to the end even if a reload happens.
    pub fn policy(&self) -> Arc<Policy> {
        self.policies.current()
    }

    /// See [`explain`]; for clients, so policy files are named without their directories.
    pub async fn explain(
        &self,
        caller: Admitted,
        request: &ChatRequest,
    ) -> Result<Explained, GatewayError> {
        let policy = self.policy();
        let meaning = match policy.needs_meaning() {
            true => self.meaning(&request.messages).await,
            false => None,
        };
        let mut explained = explain(&self.tiers, &policy, caller.0, request, meaning.as_deref())?;
        let file_name = |path: &mut std::path::PathBuf| {
            if let Some(name) = path.file_name() {
                *path = name.into();
            }
        };
        let explanation = &mut explained.explanation;
        explanation.policy.iter_mut().for_each(file_name);
        explanation
            .rules
            .iter_mut()
            .for_each(|rule| file_name(&mut rule.file));
        Ok(explained)
    }

    /// The embedding of the last user message, when an embedding model is loaded. A failure
    /// is logged and routes as if none were loaded (`similar_to` rules do not match).
    async fn meaning(&self, messages: &[ChatMessage]) -> Option<Embedding> {
        let embedder = self.policies.embedder()?;
        let last_user = messages.iter().rev().find(|m| m.role == Role::User)?;
        let embedding = embedder
            .embed(&last_user.content)
            .instrument(tracing::debug_span!("embed"));
        // A backlog must not hold the request past any budget: without the vector it
        // routes by its other features and skips the semantic lookup.
        match tokio::time::timeout(EMBED_WAIT, embedding).await {
            Ok(Ok(vector)) => Some(vector),
            Ok(Err(err)) => {
                tracing::warn!(%err, "could not embed the request");
                None
            }
            Err(_) => {
                tracing::warn!(
                    waited_ms = EMBED_WAIT.as_millis() as u64,
                    "embedding took too long; routing without it"
                );
                None
            }
        }
    }

    /// Checks the caller's key and spends one request of its quota; refusals are counted.
    /// Done before a request body is read, so an unknown caller costs nothing more.
    pub fn admit(&self, mut caller: Caller) -> Result<Admitted, GatewayError> {
        let client = self
            .admission
            .admit(caller.api_key.as_deref())
            .map_err(|denied| self.refuse(denied))
            .inspect_err(|err| self.count_refused(err.http_status()))?;
        caller.tenant = client.and_then(|c| c.tenant);
        Ok(Admitted(caller))
    }

    fn refuse(&self, denied: Denied) -> GatewayError {
        self.metrics
            .rate_limited
            .get_or_create(&ReasonLabels {
                reason: denied.reason().to_owned(),
            })
            .inc();
        GatewayError::Denied(denied)
    }

    /// Counts a request refused before any model was chosen for it (a bad body, no key, an
    /// unknown model or route): `tiergate_requests_total` with empty model and tier labels.
    pub fn count_refused(&self, status: u16) {
        count_request(
            &self.metrics,
            &ModelLabels {
                model: String::new(),
                tier: String::new(),
            },
            &status.to_string(),
            "none",
        );
    }

    /// Serves one chat request up to its first token; the rest comes from [`Served::reply`].
    pub async fn serve(
        &self,
        caller: Admitted,
        request: ChatRequest,
    ) -> Result<Served, GatewayError> {
        // One span per request, so that every line it logs names it; the route span and
        // the engine's queue, prefill and decode spans are its children. It carries the
        // reply's id only: what an access line says is gathered in `Outcome` and logged
        // once, as each field recorded on a span is formatted when recorded.
        let id = reply_id();
        let span = tracing::info_span!("request", id = %id);
        self.serve_in(span.clone(), id, caller.0, request)
            .instrument(span.clone())
            .await
            .inspect_err(|err| {
                // Budget errors come after a model was chosen; `Outcome` counted them.
                if !matches!(err, GatewayError::Budget(_)) {
                    let status = err.http_status();
                    self.count_refused(status);
                    tracing::info!(target: access::TARGET, parent: &span, status = %status, error = %err, "refused");
                }
            })
    }

    async fn serve_in(
        &self,
        span: tracing::Span,
        id: String,
        caller: Caller,
        request: ChatRequest,
    ) -> Result<Served, GatewayError> {
        let pin = self.tiers.resolve(&request.model)?;
        let text_bytes = request.messages.iter().map(|m| m.content.len()).sum();
        if let Some(too_large) = self.tiers.too_large(text_bytes) {
            return Err(too_large.into());
        }
        let bytes = message_bytes(&request.messages);
        let accepted_at = Instant::now();
        let api_key = caller.api_key.clone();
        let ChatRequest {
            model: _,
            stream,
            include_usage,
            messages,
            sampling,
            max_tokens,
            stop,
            ignore_eos,
            format,
            logprobs,
            tools,
            n,
        } = request;
        let mut generation = GenerationRequest {
            messages,
            sampling,
            max_tokens,
            max_tokens_cap: None,
            stop,
            ignore_eos,
            format,
            logprobs,
            tools,
            n,
            span: span.clone(),
            first_token_by: None,
        };
        let policy = self.policy();
        // A pin the policy ignores must not choose the tokenizer either.
        let pin = pin.filter(|_| policy.allow_pinning);
        let tokens = self.tiers.counter(&generation.messages, pin.as_ref());
        let pinned_tier = pin.as_ref().map(|p| p.tier.as_str());
        let pinned = pin.as_ref().map(|p| (p.tier.as_str(), p.model.as_deref()));
        // A request with tools or several choices routes around tiers that cannot serve
        // it: not the route of the same words without them, so not remembered.
        let needs_capability = generation.tools.is_some() || generation.n > 1;
        let route_key = route_key(&generation.messages, max_tokens, &caller, pinned)
            .filter(|_| !needs_capability);
        // One embedding per request, shared by `similar_to` rules and the semantic cache,
        // made only when the route depends on it (or the route caches by meaning).
        let mut meaning = None;
        let route = match route_key.as_deref().and_then(|key| policy.remembered(key)) {
            Some(route) => route,
            None => {
                // Features and exact token counts are CPU work; see `cpu_bound`.
                let mut features = cpu_bound(bytes, || {
                    Features::extract(&generation.messages, max_tokens, caller)
                });
                if needs_capability {
                    features.unservable_tiers = self
                        .tiers
                        .unable_to_serve(generation.tools.is_some(), generation.n);
                }
                let mut asked_meaning = false;
                if policy.needs_meaning()
                    && cpu_bound(bytes, || policy.reaches_similar_to(&features, &tokens))
                {
                    asked_meaning = true;
                    meaning = self.meaning(&generation.messages).await;
                    features.similar = meaning.as_deref().and_then(|vector| policy.similar(vector));
                }
                let route = cpu_bound(bytes, || {
                    tracing::debug_span!("route").in_scope(|| {
                        let route = policy.route(&features, &tokens, pinned_tier);
                        let route = route_around(&self.tiers, route, &features.unservable_tiers);
                        tracing::debug!(rule = %route.rule, tier = %route.tier, pinned = route.pinned, "routed");
                        route
                    })
                });
                // A route made without an input it asked for (an embedding that timed
                // out, a tier that could not count yet) is not kept.
                let complete = (!asked_meaning || meaning.is_some()) && tokens.all_counted();
                if let Some(key) = route_key.filter(|_| complete) {
                    policy.remember(key, &route);
                }
                route
            }
        };
        let route_time = accepted_at.elapsed();
        self.metrics
            .route_decisions
            .get([&route.tier, &route.rule])
            .inc();
        if let Some(cap) = route.max_tokens {
            generation.max_tokens = generation.max_tokens.map(|n| n.min(cap));
            generation.max_tokens_cap = Some(cap);
        }
        let pinned_model = pinned_model(&route, pin.as_ref());
        let routed = ModelLabels {
            model: backend_id(&self.tiers, &route, pin.as_ref())?,
            tier: route.tier.clone(),
        };

        // The most this request can use: its prompt plus the completion it may generate
        // (a request without max_tokens or a policy cap is charged its prompt only).
        if let Some(key) = api_key.as_deref() {
            let prompt = cpu_bound(bytes, || tokens.prompt_tokens(&route.tier)).unwrap_or(0);
            let completion = generation.max_tokens.or(route.max_tokens).unwrap_or(0);
            let completions = completion.saturating_mul(generation.n.max(1));
            self.admission
                .spend_tokens(key, prompt.saturating_add(completions))
                .map_err(|denied| self.refuse(denied))?;
        }
        let outcome = Outcome {
            metrics: self.metrics.clone(),
            labels: routed,
            span,
            id,
            access: AccessDetails {
                rule: route.rule.clone(),
                ..AccessDetails::default()
            },
            accepted_at,
            stream,
            generated_here: true,
            ended: false,
        };

        let ends_with_user = generation
            .messages
            .last()
            .is_some_and(|m| m.role == Role::User);
        if route.cache == CacheMode::Semantic && meaning.is_none() && ends_with_user {
            meaning = self.meaning(&generation.messages).await;
        }
        let deadlines = Deadlines::new(accepted_at, &route);
        let planner = Planner {
            tiers: &self.tiers,
            cache: &self.cache,
            metrics: &self.metrics,
            calibration: &self.calibration,
        };
        let attempt = Attempt {
            generation: &generation,
            route: &route,
            pinned_model,
            tokens: &tokens,
            api_key: api_key.as_deref(),
            deadlines,
            meaning,
            whole: !stream,
        };
        let acquired = match planner.acquire(attempt).await {
            Ok(acquired) => acquired,
            Err(err) => {
                let err = GatewayError::Budget(err);
                outcome.end(&err.http_status().to_string(), "none");
                return Err(err);
            }
        };
        Ok(self.served(
            acquired,
            route,
            route_time,
            include_usage,
            deadlines,
            outcome,
        ))
    }

    /// Records what is known at the first token and wraps the source for reading.
    fn served(
        &self,
        acquired: Acquired,
        route: Route,
        route_time: Duration,
        include_usage: bool,
        deadlines: Deadlines,
        mut outcome: Outcome,
    ) -> Served {
        let labels = ModelLabels {
            model: acquired.model.clone(),
            tier: acquired.tier.clone(),
        };
        let generated_here = acquired.cache.is_none_or(CacheUse::generated);
        let ttft = outcome.accepted_at.elapsed();
        self.metrics
            .time_to_first_token
            .of(&labels)
            .observe(ttft.as_secs_f64());
        let access = &mut outcome.access;
        access.prompt_tokens = Some(acquired.prompt_tokens);
        access.ttft_ms = Some(ttft.as_millis() as u64);
        access.degraded = acquired.degraded.as_ref().map(ToString::to_string);
        access.cache = acquired.cache.map(CacheUse::as_str);
        access.endpoint.clone_from(&acquired.endpoint);
        if generated_here {
            self.metrics
                .prompt_tokens
                .of(&labels)
                .inc_by(u64::from(acquired.prompt_tokens));
        }
        // Gaps between pieces mean something only for text generated for this reply.
        let inter_token = generated_here.then(|| self.metrics.inter_token_latency.of(&labels));
        outcome.labels = labels;
        outcome.generated_here = generated_here;
        let mut source = acquired.source;
        let siblings = match &mut source {
            Source::Engine(tokens) => tokens.take_siblings(),
            _ => Vec::new(),
        };
        let other_choices = siblings
            .into_iter()
            .map(|stream| OtherChoice {
                stream,
                deadline: deadlines.total,
                prompt_tokens: acquired.prompt_tokens,
                pieces: 0,
                ended: false,
            })
            .collect();
        Served {
            id: outcome.id.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            tier: acquired.tier,
            model: acquired.model,
            prompt_tokens: acquired.prompt_tokens,
            degraded: acquired.degraded,
            cache: acquired.cache,
            similarity: acquired.similarity,
            endpoint: acquired.endpoint,
            route,
            route_time,
            include_usage,
            other_choices,
            reply: Reply {
                source,
                first: Some(acquired.first),
                prompt_tokens: acquired.prompt_tokens,
                pieces: 0,
                deadline: deadlines.total,
                inter_token,
                last_piece_at: None,
                outcome,
            },
        }
    }
}

/// A request with its first event in hand: who answers, and the reply to read.
pub struct Served {
    /// `chatcmpl-…`, shared by every chunk of the response.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The tier and model that answer (the routed ones unless degraded).
    pub tier: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub degraded: Option<Degradation>,
    /// `None` when the route does not cache this request.
    pub cache: Option<CacheUse>,
    /// For a semantic cache hit: the cosine similarity of the cached question.
    pub similarity: Option<f32>,
    /// The remote endpoint that answers, when the tier is a fleet.
    pub endpoint: Option<String>,
    pub route: Route,
    /// Time spent routing (features, token counts, policy).
    pub route_time: Duration,
    pub include_usage: bool,
    /// Choice 0.
    pub reply: Reply,
    /// Choices 1.. of a request with `n` > 1.
    pub other_choices: Vec<OtherChoice>,
}

/// One more choice of a request with `n` > 1: its events under the request's total
/// budget. Its tokens are counted in the request's usage, not in the request metrics
/// (those follow choice 0). Dropping it cancels its sequence.
pub struct OtherChoice {
    stream: TokenStream,
    deadline: Instant,
    prompt_tokens: u32,
    pieces: u32,
    ended: bool,
}

impl OtherChoice {
    /// The next event; `None` after the ending or failure.
    pub async fn next(&mut self) -> Option<ReplyEvent> {
        if self.ended {
            return None;
        }
        let event = match tokio::time::timeout_at(self.deadline, self.stream.next_event()).await {
            Ok(event) => event.unwrap_or_else(unfinished),
            Err(_elapsed) => {
                self.ended = true;
                return Some(ReplyEvent::Finished(budget_cut(
                    self.prompt_tokens,
                    self.pieces,
                )));
            }
        };
        let event = ReplyEvent::from(event);
        match event {
            ReplyEvent::Finished(_) | ReplyEvent::Failed(_) => self.ended = true,
            ReplyEvent::Text(_) | ReplyEvent::Scored { .. } | ReplyEvent::ToolCalls(_) => {
                self.pieces += 1;
            }
        }
        Some(event)
    }

    /// Reads the whole choice (or as much as the total budget allows).
    pub async fn collect(mut self) -> Result<Completion, EngineError> {
        let mut collector = Collector::default();
        while let Some(event) = self.next().await {
            if let Some(done) = collector.push(event) {
                return done;
            }
        }
        Err(EngineError::Decode("the reply was already read".into()))
    }
}

/// The ending of a reply whose total budget ran out: `length`, with the text events
/// delivered counted as completion tokens (a text event carries at least one token).
fn budget_cut(prompt_tokens: u32, pieces: u32) -> Ending {
    Ending {
        finish_reason: FinishReason::Length,
        usage: Usage {
            prompt_tokens,
            completion_tokens: pieces,
            cached_prompt_tokens: None,
        },
        budget_cut: true,
        timings: StageTimings::default(),
    }
}

/// Gathers one choice's events into a [`Completion`].
#[derive(Default)]
struct Collector {
    text: String,
    logprobs: Option<Vec<TokenLogprob>>,
    tool_calls: Vec<serde_json::Value>,
}

impl Collector {
    /// Takes the next event; the whole reply (or its failure) once it has ended.
    fn push(&mut self, event: ReplyEvent) -> Option<Result<Completion, EngineError>> {
        match event {
            ReplyEvent::Text(piece) => self.text.push_str(&piece),
            ReplyEvent::Scored { text, logprobs } => {
                self.text.push_str(&text);
                self.logprobs.get_or_insert_with(Vec::new).extend(logprobs);
            }
            ReplyEvent::ToolCalls(deltas) => merge_tool_calls(&mut self.tool_calls, deltas),
            ReplyEvent::Finished(ending) => {
                return Some(Ok(Completion {
                    text: std::mem::take(&mut self.text),
                    logprobs: self.logprobs.take(),
                    tool_calls: finish_tool_calls(std::mem::take(&mut self.tool_calls)),
                    ending,
                }))
            }
            ReplyEvent::Failed(err) => return Some(Err(err)),
        }
        None
    }
}

/// How a reply ended well: on its own, or cut by the total budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// True when the total budget ran out: `finish_reason` is then `length`.
    pub budget_cut: bool,
    pub timings: StageTimings,
}

/// What a reader of a [`Reply`] gets, in order: text, then one ending or failure.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyEvent {
    Text(String),
    /// Text with its tokens' log probabilities (requests that asked for them).
    Scored {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// `tool_calls` deltas from a remote tier, as OpenAI streams them.
    ToolCalls(Vec<serde_json::Value>),
    Finished(Ending),
    Failed(EngineError),
}

/// A source's event as a reader sees it; an ending from the source was not cut by the
/// budget.
impl From<TokenEvent> for ReplyEvent {
    fn from(event: TokenEvent) -> Self {
        match event {
            TokenEvent::Text(text) => ReplyEvent::Text(text),
            TokenEvent::Scored { text, logprobs } => ReplyEvent::Scored { text, logprobs },
            TokenEvent::ToolCalls(calls) => ReplyEvent::ToolCalls(calls),
            TokenEvent::Finished {
                finish_reason,
                usage,
                timings,
            } => ReplyEvent::Finished(Ending {
                finish_reason,
                usage,
                budget_cut: false,
                timings,
            }),
            TokenEvent::Failed(err) => ReplyEvent::Failed(err),
        }
    }
}

/// A whole non-streaming reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    /// Every token's log probability, when the request asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// The tools the model called, each whole (the stream's deltas merged).
    pub tool_calls: Vec<serde_json::Value>,
    pub ending: Ending,
}

/// One reply's events under its total budget. Dropping it before the end cancels the
/// sequence (the engine sees its channel close) and counts the request as aborted.
pub struct Reply {
    source: Source,
    first: Option<TokenEvent>,
    prompt_tokens: u32,
    /// Text events delivered: the completion-token count reported when the budget cuts
    /// a reply short (a text event carries at least one token).
    pieces: u32,
    deadline: Instant,
    /// Where gaps between text events are observed, if they are measured for this reply.
    inter_token: Option<Histogram>,
    last_piece_at: Option<Instant>,
    outcome: Outcome,
}

impl Reply {
    /// The next event; `None` after the ending or failure has been returned.
    pub async fn next(&mut self) -> Option<ReplyEvent> {
        if self.outcome.ended {
            return None;
        }
        let event = match self.first.take() {
            Some(first) => first,
            // A replay is in memory: no deadline to race (nor a timer to set up per token).
            None => match self.source.replayed_event() {
                Some(event) => event,
                None => {
                    match tokio::time::timeout_at(self.deadline, self.source.next_event()).await {
                        Ok(event) => event,
                        Err(_elapsed) => return Some(self.cut()),
                    }
                }
            },
        };
        let event = ReplyEvent::from(event);
        match &event {
            ReplyEvent::Text(_) | ReplyEvent::Scored { .. } | ReplyEvent::ToolCalls(_) => {
                self.piece_delivered();
            }
            ReplyEvent::Finished(ending) => self.outcome.finished(ending),
            ReplyEvent::Failed(err) => {
                // Read outside the request span (the HTTP body streams later), so name it as parent.
                tracing::warn!(parent: &self.outcome.span, %err, "generation failed after its first token");
                self.outcome.failed(err);
            }
        }
        Some(event)
    }

    fn piece_delivered(&mut self) {
        self.pieces += 1;
        // Only gaps in text generated for this reply are measured (not a replay's).
        let Some(histogram) = &self.inter_token else {
            return;
        };
        let now = Instant::now();
        if let Some(last) = self.last_piece_at {
            histogram.observe((now - last).as_secs_f64());
        }
        self.last_piece_at = Some(now);
    }

    /// The total budget ran out: `length`, with the text events delivered counted as
    /// completion tokens. The source is dropped with the reply, cancelling the sequence.
    fn cut(&mut self) -> ReplyEvent {
        let ending = budget_cut(self.prompt_tokens, self.pieces);
        tracing::info!(parent: &self.outcome.span, "total budget spent: reply cut");
        self.outcome.finished(&ending);
        ReplyEvent::Finished(ending)
    }

    /// Reads the whole reply (or as much as the total budget allows).
    pub async fn collect(mut self) -> Result<Completion, EngineError> {
        let mut collector = Collector::default();
        while let Some(event) = self.next().await {
            if let Some(done) = collector.push(event) {
                return done;
            }
        }
        Err(EngineError::Decode("the reply was already read".into()))
    }
}

/// Folds streamed `tool_calls` deltas into whole calls, as OpenAI's SDKs do: the delta
/// with a new `index` (0 when missing) starts a call (its `id`, `type` and
/// `function.name`), later ones append to its `function.arguments`. The calls keep their
/// `index` until [`finish_tool_calls`].
fn merge_tool_calls(calls: &mut Vec<serde_json::Value>, deltas: Vec<serde_json::Value>) {
    use serde_json::Value;
    for mut delta in deltas {
        let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0);
        let Some(call) = calls
            .iter_mut()
            .find(|c| c.get("index").and_then(Value::as_u64) == Some(index))
        else {
            if let Some(fields) = delta.as_object_mut() {
                fields.insert("index".into(), index.into());
                calls.push(delta);
            }
            continue;
        };
        let more = delta
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(Value::String(arguments)) = call.pointer_mut("/function/arguments") {
            arguments.push_str(more);
        } else if let Some(function) = call.get_mut("function").and_then(Value::as_object_mut) {
            function.insert("arguments".into(), Value::String(more.to_owned()));
        }
        // A field the first delta lacked (some servers send the id later) is taken as it comes.
        let Some(call) = call.as_object_mut() else {
            continue;
        };
        for field in ["id", "type", "function"] {
            if call.get(field).is_none_or(Value::is_null) {
                if let Some(value) = delta.get(field) {
                    call.insert(field.into(), value.clone());
                }
            }
        }
    }
}

/// Merged calls as a non-streamed message carries them: without the streaming `index`.
fn finish_tool_calls(mut calls: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    for call in &mut calls {
        if let Some(fields) = call.as_object_mut() {
            fields.remove("index");
        }
    }
    calls
}

/// The one place a request's outcome is recorded: `tiergate_requests_total` once per
/// request, the end-to-end latency, generated tokens and budget cuts, and its access line.
struct Outcome {
    metrics: Arc<Metrics>,
    /// The routed model until the first token, then the model that answered.
    labels: ModelLabels,
    span: tracing::Span,
    /// The reply's id, also the request span's.
    id: String,
    access: AccessDetails,
    accepted_at: Instant,
    /// A failure after the first token is a `stream_error` when streaming, else the
    /// error's status (the client has not seen a status yet).
    stream: bool,
    /// False for replies replayed from the cache or followed from another response's
    /// generation: their tokens were counted once, by the response that generated them.
    generated_here: bool,
    ended: bool,
}

impl Outcome {
    fn end(mut self, status: &str, finish_reason: &str) {
        self.count(status, finish_reason);
    }

    /// Counts the request and writes its access line: called once, when it ends.
    fn count(&mut self, status: &str, finish_reason: &str) {
        self.ended = true;
        count_request(&self.metrics, &self.labels, status, finish_reason);
        let access = &self.access;
        AccessLine {
            id: &self.id,
            status,
            finish_reason,
            rule: &access.rule,
            tier: &self.labels.tier,
            model: &self.labels.model,
            degraded: access.degraded.as_deref(),
            endpoint: access.endpoint.as_deref(),
            cache: access.cache,
            prompt_tokens: access.prompt_tokens,
            completion_tokens: access.completion_tokens,
            ttft_ms: access.ttft_ms,
            total_ms: self.accepted_at.elapsed().as_millis() as u64,
        }
        .log(&self.span);
    }

    fn finished(&mut self, ending: &Ending) {
        let finish_reason = ending.finish_reason.as_str();
        self.access.completion_tokens = Some(ending.usage.completion_tokens);
        self.count("200", finish_reason);
        self.metrics
            .e2e_request_latency
            .of(&self.labels)
            .observe(self.accepted_at.elapsed().as_secs_f64());
        if self.generated_here {
            self.metrics
                .generated_tokens
                .of(&self.labels)
                .inc_by(u64::from(ending.usage.completion_tokens));
        }
        if ending.budget_cut {
            self.metrics
                .budget_cuts
                .get_or_create(&TierLabels {
                    tier: self.labels.tier.clone(),
                })
                .inc();
        }
    }

    fn failed(&mut self, err: &EngineError) {
        let status = if self.stream {
            "stream_error".to_owned()
        } else {
            engine_status(err).to_string()
        };
        self.count(&status, "error");
    }
}

/// A reply's id, `chatcmpl-` and 32 hex digits, as OpenAI's look.
fn reply_id() -> String {
    const PREFIX: &str = "chatcmpl-";
    let mut digits = uuid::Uuid::encode_buffer();
    let mut id = String::with_capacity(PREFIX.len() + uuid::fmt::Simple::LENGTH);
    id.push_str(PREFIX);
    id.push_str(uuid::Uuid::new_v4().simple().encode_lower(&mut digits));
    id
}

/// What a request's access line says beyond its labels, gathered as the request goes.
#[derive(Debug, Default)]
struct AccessDetails {
    rule: String,
    degraded: Option<String>,
    endpoint: Option<String>,
    cache: Option<&'static str>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    ttft_ms: Option<u64>,
}

/// `tiergate_requests_total`: the one counter every request reaches once.
fn count_request(metrics: &Metrics, labels: &ModelLabels, status: &str, finish_reason: &str) {
    metrics
        .requests
        .get([&labels.model, &labels.tier, status, finish_reason])
        .inc();
}

/// A client that leaves mid-reply drops it: the request counts as aborted, as vLLM does,
/// so every request reaches `tiergate_requests_total` once.
impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.ended {
            self.count("client_closed", "abort");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{finish_tool_calls, merge_tool_calls};

    #[test]
    fn tool_call_deltas_merge_into_whole_calls() {
        let mut calls = Vec::new();
        merge_tool_calls(
            &mut calls,
            vec![json!({"index": 0, "id": "a", "type": "function",
                        "function": {"name": "f", "arguments": ""}})],
        );
        merge_tool_calls(
            &mut calls,
            vec![
                json!({"index": 0, "function": {"arguments": "{\"x\":"}}),
                // A second call whose id comes late, and a server that sends no index.
                json!({"index": 1, "function": {"name": "g", "arguments": "{}"}}),
            ],
        );
        merge_tool_calls(
            &mut calls,
            vec![
                json!({"index": 0, "function": {"arguments": " 1}"}}),
                json!({"index": 1, "id": "b", "type": "function"}),
            ],
        );
        assert_eq!(
            finish_tool_calls(calls),
            vec![
                json!({"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}),
                json!({"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}),
            ]
        );
        let mut unindexed = Vec::new();
        for part in ["{\"a\"", ": 2}"] {
            merge_tool_calls(
                &mut unindexed,
                vec![json!({"function": {"arguments": part}})],
            );
        }
        assert_eq!(unindexed.len(), 1);
        assert_eq!(unindexed[0]["function"]["arguments"], "{\"a\": 2}");
    }
}
