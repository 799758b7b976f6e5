//! Keeping a request's latency budget: choose where its reply comes from.
//!
//! Tried in order along the degrade path (the routed tier, then each smaller one):
//!
//! 1. a fresh cached reply for that tier;
//! 2. the tier itself, if its predicted time to first token fits what is left of the
//!    budget (an identical running generation is joined instead of started);
//! 3. after admission, a watchdog: no first token in time cancels the sequence (freeing its
//!    slot) and moves on. It fires early enough that the next tier can still answer
//!    within the same budget (see `Planner::hedge`).
//!
//! When no tier fits, a stale reply within `max_stale` is served, else [`BudgetError::Exhausted`]
//! names every tier tried and why it was passed over, with a `Retry-After` from the
//! smallest predicted overrun (TensorZero collects every provider's error the same way).
//!
//! Deadlines are on tokio's clock, so tests run this under a paused clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::{self, Follower, Freshness, Lookup, ReplyCache, ReplyKey};
use crate::chat::message_bytes;
use dashmap::DashMap;

use crate::embed::Embedding;
use crate::engine::{
    EngineError, GenerationRequest, Health, PromptLimits, StageTimings, TokenEvent, TokenStream,
};
use crate::metrics::{DegradeLabels, GuardLabels, Metrics, SemanticLabels, TierLabels};
use crate::router::{CacheMode, Route, TokenCounter};
use crate::semantic::SemanticLookup;
use crate::tiers::{unable_to_serve, Tiers};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradeReason {
    /// The tier's live queue state predicted a first token after the budget.
    PredictedTtft,
    /// The tier's queue was full.
    QueueFull,
    /// Admitted, but no first token came within the budget; the sequence was cancelled.
    TtftWatchdog,
    /// The tier is loading or down, or refused the request as not running.
    Unavailable,
    /// The prompt (with `max_tokens`) does not fit the tier's context.
    ContextLength,
}

impl DegradeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DegradeReason::PredictedTtft => "predicted_ttft",
            DegradeReason::QueueFull => "queue_full",
            DegradeReason::TtftWatchdog => "ttft_watchdog",
            DegradeReason::Unavailable => "unavailable",
            DegradeReason::ContextLength => "context_length",
        }
    }
}

/// The request was served somewhere other than where the policy routed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degradation {
    pub from: String,
    pub to: String,
    pub reason: DegradeReason,
}

/// `x-tiergate-degraded: full->fast; reason=predicted_ttft`
impl fmt::Display for Degradation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}->{}; reason={}",
            self.from,
            self.to,
            self.reason.as_str()
        )
    }
}

/// How the cache took part in a reply, for `x-tiergate-cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// Generated here and stored for the next identical request.
    Miss,
    /// Followed an identical generation that was already running.
    Shared,
    Hit,
    /// A cached reply to a question that means the same (`cache = "semantic"`).
    Semantic,
    /// Past its TTL, served because no tier could answer in time.
    Stale,
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheUse::Miss => "miss",
            CacheUse::Shared => "shared",
            CacheUse::Hit => "hit",
            CacheUse::Semantic => "semantic",
            CacheUse::Stale => "stale",
        }
    }

    /// Whether this response ran its own generation (and so counts its tokens).
    pub fn generated(self) -> bool {
        self == CacheUse::Miss
    }

    /// Whether the reply is a replay of stored text rather than a generation.
    pub fn replayed(self) -> bool {
        matches!(self, CacheUse::Hit | CacheUse::Semantic | CacheUse::Stale)
    }
}

/// One tier the planner passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedOver {
    pub tier: String,
    pub why: String,
}

impl fmt::Display for PassedOver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.tier, self.why)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// No tier on the degrade path could answer within the budget, and no stale reply was
    /// kept: every tier tried, each with its reason.
    #[error(
        "no tier can answer within this request's {ttft_ms} ms time-to-first-token budget now ({}); retry later",
        passed_over.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Exhausted {
        ttft_ms: u64,
        passed_over: Vec<PassedOver>,
        retry_after: Duration,
    },
    /// A backend refused the request for a reason another tier would not fix (a prompt
    /// that does not fit, a model still loading) or failed before its first token.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Where a response's token events come from.
pub enum Source {
    Engine(TokenStream),
    Shared(Follower),
    Replay(std::vec::IntoIter<TokenEvent>),
}

impl Source {
    /// The next event; a source that ends without a last event reads as a failure, so a
    /// stream always finishes well-formed.
    pub async fn next_event(&mut self) -> TokenEvent {
        let event = match self {
            Source::Engine(tokens) => tokens.next_event().await,
            Source::Shared(follower) => follower.next_event().await,
            Source::Replay(events) => events.next(),
        };
        event.unwrap_or_else(unfinished)
    }

    /// A replay's next event, at once; `None` for a source that generates.
    pub fn replayed_event(&mut self) -> Option<TokenEvent> {
        match self {
            Source::Replay(events) => Some(events.next().unwrap_or_else(unfinished)),
            Source::Engine(_) | Source::Shared(_) => None,
        }
    }

    /// The remote endpoint generating this reply (none for a replay from the cache).
    pub fn endpoint(&self) -> Option<String> {
        match self {
            Source::Engine(tokens) => tokens.endpoint().map(str::to_owned),
            Source::Shared(follower) => follower.endpoint(),
            Source::Replay(_) => None,
        }
    }
}

/// What a source that ends without a last event reads as.
pub(crate) fn unfinished() -> TokenEvent {
    TokenEvent::Failed(EngineError::Decode(
        "the model thread ended the sequence without finishing it".into(),
    ))
}

/// A reply source with its first event in hand.
pub struct Acquired {
    pub source: Source,
    pub first: TokenEvent,
    /// The tier that answers (the routed one unless degraded).
    pub tier: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub degraded: Option<Degradation>,
    /// `None` when the request is not cacheable.
    pub cache: Option<CacheUse>,
    /// For a semantic hit: how close the cached question was.
    pub similarity: Option<f32>,
    /// The remote endpoint that answers, when a fleet does.
    pub endpoint: Option<String>,
}

/// One request's budget, fixed when it was accepted.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub first_token: Instant,
    pub total: Instant,
}

impl Deadlines {
    pub fn new(accepted_at: Instant, route: &Route) -> Self {
        Self {
            first_token: accepted_at + Duration::from_millis(route.ttft_ms),
            total: accepted_at + Duration::from_millis(route.total_ms),
        }
    }
}

/// Whether this route caches this request.
fn cacheable(route: &Route, generation: &GenerationRequest) -> bool {
    // A replay carries one choice's text only: token distributions, tool calls and other
    // choices are not kept.
    if generation.logprobs.is_some() || generation.tools.is_some() || generation.n > 1 {
        return false;
    }
    match route.cache {
        CacheMode::Off => false,
        CacheMode::Deterministic => cache::is_reproducible(&generation.sampling),
        CacheMode::Always | CacheMode::Semantic => true,
    }
}

/// Runs CPU-bound request work (templating, tokenizing, routing) over a prompt of
/// `prompt_bytes` ([`message_bytes`]). A long prompt takes milliseconds, so on a
/// multi-threaded runtime the worker hands its other tasks to another thread while it
/// runs (`block_in_place`). For a short one the work is smaller than that hand-off (a
/// thread woken, two context switches), which cost a cache hit most of its time: it runs
/// in place. A current-thread runtime (the paused-clock tests) always runs it in place.
pub fn cpu_bound<R>(prompt_bytes: usize, work: impl FnOnce() -> R) -> R {
    if prompt_bytes < CPU_BOUND_INLINE_BYTES {
        return work();
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Prompts smaller than this are templated, counted and routed in place (see
/// [`cpu_bound`]): some 2,000 tokens, whose routing features and memoised counts take
/// tens of microseconds.
pub const CPU_BOUND_INLINE_BYTES: usize = 8 * 1024;

/// Below this many observations a tier's predictions are used as they are.
const CALIBRATION_MIN_SAMPLES: u32 = 3;
/// A calibration factor is kept within these bounds: one odd request must not make a tier
/// look free or hopeless.
const CALIBRATION_BOUNDS: (f64, f64) = (0.5, 4.0);
/// Weight of each new observation in the moving averages.
const CALIBRATION_WEIGHT: f64 = 0.2;

/// How each tier's TTFT predictions compared with what its requests then saw, kept per
/// tier: predictions are scaled by the observed ratio, and a tier whose requests have been
/// answering well inside their budgets is not shed on a prediction alone.
#[derive(Default)]
pub struct Calibration {
    tiers: DashMap<String, TierRecord>,
}

/// Moving averages of one tier's observations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TierRecord {
    /// Observed over predicted time to first token.
    pub ratio: f64,
    /// Observed time to first token, from submit, in seconds.
    pub observed_s: f64,
    pub samples: u32,
}

impl TierRecord {
    /// `raw` scaled by the observed ratio, once there are enough observations.
    pub fn calibrate(&self, raw: Duration) -> Duration {
        if self.samples < CALIBRATION_MIN_SAMPLES {
            return raw;
        }
        let (low, high) = CALIBRATION_BOUNDS;
        raw.mul_f64(self.ratio.clamp(low, high))
    }
}

impl Calibration {
    pub fn record(&self, tier: &str) -> TierRecord {
        self.tiers.get(tier).map(|r| *r).unwrap_or_default()
    }

    /// A request on `tier` was predicted to see its first token after `predicted` and saw
    /// it after `observed` (or was cancelled after waiting that long: a lower bound, which
    /// still moves the averages the right way). Returns the ratio.
    pub fn observe(&self, tier: &str, predicted: Duration, observed: Duration) -> f64 {
        // A prediction under a millisecond is "free"; compare against a millisecond.
        let ratio = observed.as_secs_f64() / predicted.as_secs_f64().max(0.001);
        let mut record = self.tiers.entry(tier.to_owned()).or_default();
        let fold = |old: f64, new: f64, first: bool| {
            if first {
                new
            } else {
                old + CALIBRATION_WEIGHT * (new - old)
            }
        };
        let first = record.samples == 0;
        // Bounded before averaging: one cold or overhead-bound request (a 1 ms prediction
        // that took 2 s) must not pin the factor at its bound for dozens of requests.
        let (low, high) = CALIBRATION_BOUNDS;
        record.ratio = fold(record.ratio, ratio.clamp(low, high), first);
        record.observed_s = fold(record.observed_s, observed.as_secs_f64(), first);
        record.samples = record.samples.saturating_add(1);
        ratio
    }
}

/// What the planner works with: the backends, the reply cache, and where it counts.
#[derive(Clone, Copy)]
pub struct Planner<'a> {
    pub tiers: &'a Tiers,
    pub cache: &'a Arc<ReplyCache>,
    pub metrics: &'a Metrics,
    pub calibration: &'a Calibration,
}

/// One request as the planner sees it.
pub struct Attempt<'a> {
    pub generation: &'a GenerationRequest,
    pub route: &'a Route,
    /// The model the request named, when it named one (then `route.pinned` is set).
    pub pinned_model: Option<&'a str>,
    pub tokens: &'a (dyn TokenCounter + Sync),
    /// The API key, which scopes cached replies unless the route shares them.
    pub api_key: Option<&'a str>,
    pub deadlines: Deadlines,
    /// The embedding of the last user message, for a `cache = "semantic"` route.
    pub meaning: Option<Embedding>,
    /// The reader takes the reply whole (not streamed): a replay gives its text in one
    /// piece rather than one per cached piece.
    pub whole: bool,
}

/// The context error a request gets on a tier its prompt (and `max_tokens`) cannot fit.
fn misfit(
    prompt_tokens: u32,
    max_tokens: Option<u32>,
    limits: Option<PromptLimits>,
) -> Option<EngineError> {
    let context = limits?.context;
    match max_tokens {
        Some(max_tokens) if prompt_tokens.saturating_add(max_tokens) > context => {
            Some(EngineError::ContextLengthExceeded {
                prompt_tokens,
                max_tokens,
                context,
            })
        }
        // At least one position must be left to generate into.
        None if prompt_tokens >= context => Some(EngineError::PromptTooLong {
            prompt_tokens,
            context,
        }),
        _ => None,
    }
}

/// Refusals that another tier, or a later retry, may not meet: the request goes on down
/// the degrade path instead of failing with them.
fn is_load_refusal(err: &EngineError) -> bool {
    matches!(
        err,
        EngineError::QueueFull { .. }
            | EngineError::Loading { .. }
            | EngineError::Unavailable { .. }
    )
}

impl Planner<'_> {
    pub async fn acquire(self, attempt: Attempt<'_>) -> Result<Acquired, BudgetError> {
        let Attempt {
            generation,
            route,
            pinned_model,
            tokens,
            api_key,
            deadlines,
            meaning,
            whole,
        } = attempt;
        let use_cache = cacheable(route, generation);
        let prompt_bytes = message_bytes(&generation.messages);
        // Only a semantic route looks up and indexes its replies by meaning.
        let meaning = meaning.filter(|_| route.cache == CacheMode::Semantic);
        let scope = (!route.cache_shared).then(|| api_key.unwrap_or(""));
        let freshness = Freshness {
            ttl: Duration::from_secs(route.cache_ttl_s),
            max_stale: Duration::from_secs(route.max_stale_s),
        };
        // A pinned request asked for its tier by name: serving another model would
        // contradict the `model` it will see, so it is never degraded.
        let path = if route.pinned {
            vec![route.tier.clone()]
        } else {
            self.tiers.degrade_path(&route.tier)
        };

        let first_token_by = deadlines.first_token;
        let mut left_because: Option<DegradeReason> = None;
        let mut shortest_overrun: Option<Duration> = None;
        let mut passed_over = Vec::new();
        // The first tier's context error, returned when no tier on the path fits.
        let mut misfits: Option<EngineError> = None;
        let mut misfit_tiers = 0;
        let mut stale_candidates = Vec::new();
        for (index, tier) in path.iter().enumerate() {
            let mut pass = |why: String| {
                passed_over.push(PassedOver {
                    tier: tier.clone(),
                    why,
                })
            };
            let degraded = left_because.map(|reason| Degradation {
                from: route.tier.clone(),
                to: tier.clone(),
                reason,
            });
            let Some(engine) = self.tiers.backend(tier, pinned_model) else {
                pass("no model serves it".into());
                continue;
            };
            let model = engine.info().id.clone();
            // A tool-calling request on a tier that cannot call tools is the client's
            // error there, like a prompt too long for it: skipped, and a 400 if no tier
            // on the path can.
            let tools = generation.tools.is_some();
            if let Some(why) = unable_to_serve(engine.as_ref(), tools, generation.n) {
                let param = if tools { "tools" } else { "n" };
                misfits.get_or_insert(EngineError::InvalidParameter {
                    param,
                    message: format!("`{param}` is not supported on tier `{tier}`: {why}"),
                });
                pass(why);
                misfit_tiers += 1;
                continue;
            }
            // A fresh exact reply needs neither a count nor the engine: the same request
            // (every field that shapes the reply, and the model, are in the key) fitted
            // this model when it was generated, and templating and counting are most of
            // a hit's work.
            let key = use_cache.then(|| ReplyKey::new(generation, &model, scope));
            let cached = key.as_ref().map(|key| self.cache.lookup(key));
            if let Some(Lookup::Fresh(reply)) = &cached {
                return Ok(self.replay(reply, tier, model, degraded, CacheUse::Hit, whole));
            }
            // Count first: a prompt that fits no tier is the client's error, not load. A
            // count that fails (a backend loading or down, or a prompt its template
            // refuses) is left to the health check or to `submit`, whose error is the
            // client's answer.
            let counted = cpu_bound(prompt_bytes, || tokens.prompt_tokens(tier));
            // A ready tier that cannot count the prompt cannot template it: `submit` gives
            // the client's 400 for that, which no prediction must turn into a 503.
            let uncountable = counted.is_err() && engine.is_ready();
            let prompt_tokens = counted.as_ref().copied().unwrap_or(0);
            if let Some(error) = misfit(prompt_tokens, generation.max_tokens, engine.limits()) {
                pass(error.to_string());
                misfits.get_or_insert(error);
                misfit_tiers += 1;
                left_because.get_or_insert(DegradeReason::ContextLength);
                continue;
            }
            // A cached reply needs no engine, so the cache is asked before the tier's health.
            if let Some(key) = &key {
                if let Some(Lookup::Stale(_)) = cached {
                    stale_candidates.push((tier.clone(), key.clone()));
                }
                let semantic_hit = meaning
                    .as_ref()
                    .and_then(|vector| self.semantic_lookup(key, vector, route, tier));
                if let Some((reply, similarity)) = semantic_hit {
                    // The reply was to another question: usage reports this one's prompt.
                    let repriced = counted.as_ref().ok().map(|n| reply.for_prompt(*n));
                    let reply = repriced.as_ref().unwrap_or(&reply);
                    let mut acquired =
                        self.replay(reply, tier, model, degraded, CacheUse::Semantic, whole);
                    acquired.similarity = Some(similarity);
                    return Ok(acquired);
                }
            }

            match engine.health() {
                Health::Ready => {}
                Health::Loading => {
                    pass("still loading".into());
                    left_because.get_or_insert(DegradeReason::Unavailable);
                    shortest_overrun.get_or_insert(Duration::from_secs(1));
                    continue;
                }
                Health::Down(reason) => {
                    pass(format!("down: {reason}"));
                    left_because.get_or_insert(DegradeReason::Unavailable);
                    continue;
                }
            }
            let left = first_token_by.saturating_duration_since(Instant::now());
            let forecast = engine.forecast(prompt_tokens);
            let raw = forecast.ttft;
            let record = self.calibration.record(tier);
            let predicted = record.calibrate(raw);
            // Evidence beats a prediction: a tier that would take the request at once and
            // whose requests have been answering well inside the budget is tried (the
            // watchdog still guards it), unless a step is stalled past what is left.
            let proven = forecast.starts_at_once
                && forecast.stalled_for < left
                && record.samples >= CALIBRATION_MIN_SAMPLES
                && record.observed_s <= left.as_secs_f64() / 2.0
                && raw <= left * 2;
            if predicted > left && !proven && !uncountable {
                let overrun = predicted - left;
                shortest_overrun = Some(shortest_overrun.map_or(overrun, |s| s.min(overrun)));
                left_because = Some(DegradeReason::PredictedTtft);
                pass(format!(
                    "predicted first token in {} ms, {} ms left",
                    predicted.as_millis(),
                    left.as_millis()
                ));
                continue;
            }

            let next_tier = path.get(index + 1);
            let watchdog_at = first_token_by - self.hedge(tokens, prompt_bytes, next_tier, left);
            let submitted_at = Instant::now();
            // Templating and tokenizing the prompt for the engine: CPU work.
            let submit = || {
                let mut generation = generation.clone();
                generation.first_token_by = Some(watchdog_at);
                // Always handed off: templating and llama.cpp's tokenizer take a
                // millisecond or more, and only a miss gets here.
                cpu_bound(usize::MAX, || engine.submit(generation))
            };
            // An identical generation already running is followed instead of started.
            let started = match key {
                Some(key) => self
                    .cache
                    .join_or_lead(key, freshness, meaning.clone(), submit)
                    .map(|(follower, led)| {
                        let cache_use = if led {
                            CacheUse::Miss
                        } else {
                            CacheUse::Shared
                        };
                        (Source::Shared(follower), Some(cache_use))
                    }),
                None => submit().map(|stream| (Source::Engine(stream), None)),
            };
            let (mut source, cache_use) = match started {
                Ok(started) => started,
                Err(err) if is_load_refusal(&err) => {
                    left_because = Some(match err {
                        EngineError::QueueFull { .. } => DegradeReason::QueueFull,
                        _ => DegradeReason::Unavailable,
                    });
                    shortest_overrun.get_or_insert(predicted.max(Duration::from_secs(1)));
                    pass(err.to_string());
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            // Only a generation started here shows how the tier answers.
            let generated_here = cache_use.is_none_or(CacheUse::generated);
            let prompt_tokens = match &source {
                Source::Engine(stream) => stream.prompt_tokens,
                Source::Shared(follower) => follower.prompt_tokens,
                Source::Replay(_) => prompt_tokens,
            };
            // The watchdog: the first token must arrive while the budget lasts.
            match tokio::time::timeout_at(watchdog_at, source.next_event()).await {
                // A fleet finds out only after `submit` that no endpoint could take it.
                Ok(TokenEvent::Failed(err)) if is_load_refusal(&err) => {
                    left_because = Some(match err {
                        EngineError::QueueFull { .. } => DegradeReason::QueueFull,
                        _ => DegradeReason::Unavailable,
                    });
                    shortest_overrun.get_or_insert(Duration::from_secs(1));
                    pass(err.to_string());
                    continue;
                }
                Ok(TokenEvent::Failed(err)) => return Err(err.into()),
                Ok(first) => {
                    if generated_here {
                        self.observe(tier, raw, submitted_at.elapsed());
                    }
                    if let Some(cache_use) = cache_use {
                        self.count_cache(tier, cache_use);
                    }
                    self.count_degradation(degraded.as_ref());
                    return Ok(Acquired {
                        endpoint: source.endpoint(),
                        source,
                        first,
                        tier: tier.clone(),
                        model,
                        prompt_tokens,
                        degraded,
                        cache: cache_use,
                        similarity: None,
                    });
                }
                Err(_elapsed) => {
                    let waited = submitted_at.elapsed();
                    // Cancelled before its prediction came due, the request says nothing
                    // about the prediction; only a wait past it is evidence (a lower bound).
                    if generated_here && waited >= raw {
                        self.observe(tier, raw, waited);
                    }
                    tracing::warn!(%tier, budget_ms = route.ttft_ms, waited_ms = waited.as_millis() as u64,
                        "no first token in time: failing over");
                    // Dropping the source cancels the sequence (or leaves a shared one).
                    drop(source);
                    left_because = Some(DegradeReason::TtftWatchdog);
                    passed_over.push(PassedOver {
                        tier: tier.clone(),
                        why: format!("no first token within {} ms", waited.as_millis()),
                    });
                    let overrun =
                        Duration::from_millis(route.ttft_ms / 2).max(Duration::from_secs(1));
                    shortest_overrun.get_or_insert(overrun);
                }
            }
        }

        // A prompt that fits no tier on its path (or a tool call none can make) is the
        // client's error: 400, never a 503 that invites a retry.
        if misfit_tiers == path.len() {
            if let Some(error) = misfits {
                return Err(error.into());
            }
        }
        // No tier can answer in time: an old reply beats an error.
        for (tier, key) in stale_candidates {
            if let Lookup::Stale(reply) | Lookup::Fresh(reply) = self.cache.lookup(&key) {
                let model = self
                    .tiers
                    .backend(&tier, pinned_model)
                    .map_or_else(String::new, |b| b.info().id.clone());
                let degraded = Some(Degradation {
                    from: route.tier.clone(),
                    to: tier.clone(),
                    reason: left_because.unwrap_or(DegradeReason::PredictedTtft),
                });
                return Ok(self.replay(&reply, &tier, model, degraded, CacheUse::Stale, whole));
            }
        }
        self.metrics
            .shed
            .get_or_create(&TierLabels {
                tier: route.tier.clone(),
            })
            .inc();
        tracing::warn!(budget_ms = route.ttft_ms, passed_over = %passed_over.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            "shed: no tier can answer in time");
        Err(BudgetError::Exhausted {
            ttft_ms: route.ttft_ms,
            passed_over,
            retry_after: shortest_overrun.unwrap_or(Duration::from_secs(1)),
        })
    }

    /// Records how a tier's first token compared with its raw prediction.
    fn observe(&self, tier: &str, predicted: Duration, observed: Duration) {
        let ratio = self.calibration.observe(tier, predicted, observed);
        self.metrics
            .ttft_prediction_ratio
            .get_or_create(&TierLabels {
                tier: tier.to_owned(),
            })
            .observe(ratio);
    }

    /// How long before the first-token deadline the watchdog gives up on a tier, so that the
    /// next tier on the path still has time to answer within the budget: twice that tier's
    /// predicted TTFT now plus 50 ms (predictions are averages, and it must still pass its
    /// own prediction check then), at most half of what is left. The last tier gets the
    /// whole budget.
    fn hedge(
        &self,
        tokens: &(dyn TokenCounter + Sync),
        prompt_bytes: usize,
        next_tier: Option<&String>,
        left: Duration,
    ) -> Duration {
        let Some(engine) = next_tier.and_then(|tier| self.tiers.backend(tier, None)) else {
            return Duration::ZERO;
        };
        let prompt_tokens =
            cpu_bound(prompt_bytes, || tokens.prompt_tokens(&engine.info().tier)).unwrap_or(0);
        let predicted = engine.forecast(prompt_tokens).ttft;
        (predicted * 2 + Duration::from_millis(50)).min(left / 2)
    }

    /// A fresh reply to a question of the same context that means the same as this
    /// one's last user message and passes the look-alike guards, with its similarity.
    fn semantic_lookup(
        &self,
        key: &ReplyKey,
        vector: &[f32],
        route: &Route,
        tier: &str,
    ) -> Option<(Arc<cache::CachedReply>, f32)> {
        let context = key.context()?;
        let text = key.last_user()?;
        let found = self
            .cache
            .semantic
            .lookup(&context, text, vector, route.semantic_threshold);
        // What to count: the outcome, and the closest similarity seen.
        let (outcome, closest, reply) = match found {
            SemanticLookup::Hit {
                key: cached,
                cached_text,
                similarity,
            } => match self.cache.lookup(&cached) {
                Lookup::Fresh(reply) => {
                    tracing::info!(similarity, cached = %cached_text, "semantic cache hit");
                    ("hit", Some(similarity), Some((reply, similarity)))
                }
                // The reply expired or was evicted: the entry is useless now.
                _ => {
                    self.cache.semantic.forget(&context, &cached_text);
                    ("miss", Some(similarity), None)
                }
            },
            SemanticLookup::Refused {
                cached_text,
                similarity,
                refusal,
            } => {
                self.metrics
                    .semantic_refusals
                    .get_or_create(&GuardLabels {
                        guard: refusal.guard().to_owned(),
                    })
                    .inc();
                tracing::info!(similarity, cached = %cached_text, guard = refusal.guard(), %refusal,
                    "semantic cache: a look-alike was refused");
                ("refused", Some(similarity), None)
            }
            SemanticLookup::Miss { best } => ("miss", best, None),
        };
        if let Some(closest) = closest {
            self.metrics.semantic_similarity.observe(f64::from(closest));
        }
        self.metrics
            .semantic_lookups
            .get_or_create(&SemanticLabels {
                tier: tier.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        reply
    }

    fn replay(
        &self,
        reply: &cache::CachedReply,
        tier: &str,
        model: String,
        degraded: Option<Degradation>,
        cache_use: CacheUse,
        whole: bool,
    ) -> Acquired {
        self.count_cache(tier, cache_use);
        self.count_degradation(degraded.as_ref());
        let mut events = reply.events(whole).into_iter();
        let first = events.next().unwrap_or(TokenEvent::Finished {
            finish_reason: reply.finish_reason,
            usage: reply.usage,
            timings: StageTimings::default(),
        });
        Acquired {
            source: Source::Replay(events),
            first,
            tier: tier.to_owned(),
            model,
            prompt_tokens: reply.usage.prompt_tokens,
            degraded,
            cache: Some(cache_use),
            similarity: None,
            endpoint: None,
        }
    }

    fn count_cache(&self, tier: &str, cache_use: CacheUse) {
        self.metrics
            .cache_lookups
            .get([tier, cache_use.as_str()])
            .inc();
    }

    fn count_degradation(&self, degraded: Option<&Degradation>) {
        if let Some(d) = degraded {
            self.metrics
                .degradations
                .get_or_create(&DegradeLabels {
                    from: d.from.clone(),
                    to: d.to.clone(),
                    reason: d.reason.as_str().to_owned(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degradation_header_names_both_tiers_and_the_reason() {
        let d = Degradation {
            from: "full".into(),
            to: "fast".into(),
            reason: DegradeReason::TtftWatchdog,
        };
        assert_eq!(d.to_string(), "full->fast; reason=ttft_watchdog");
    }

    #[test]
    fn exhausted_names_every_tier_and_why() {
        let err = BudgetError::Exhausted {
            ttft_ms: 2000,
            passed_over: vec![
                PassedOver {
                    tier: "full".into(),
                    why: "predicted first token in 4100 ms, 1990 ms left".into(),
                },
                PassedOver {
                    tier: "fast".into(),
                    why: "the request queue of model `m` is full (4 waiting)".into(),
                },
            ],
            retry_after: Duration::from_secs(2),
        };
        assert_eq!(
            err.to_string(),
            "no tier can answer within this request's 2000 ms time-to-first-token budget now \
             (full: predicted first token in 4100 ms, 1990 ms left; fast: the request queue of \
             model `m` is full (4 waiting)); retry later"
        );
    }
}
