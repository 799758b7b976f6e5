//! Keeping a request's latency budget: choose where its reply comes from.
//!
//! Tried in order along the degrade path (the routed tier, then each smaller one):
//!
//! 1. a fresh cached reply for that tier;
//! 2. the tier itself, if its predicted time to first token fits what is left of the
//!    budget (an identical running generation is joined instead of started);
//! 3. after admission, a watchdog: no first token by the budget's end cancels the
//!    sequence (freeing its slot) and moves on, now against the total budget.
//!
//! When no tier fits, a stale reply within `max_stale` is served, else 503 with a
//! `Retry-After` from the smallest predicted overrun.

use std::fmt;
use std::time::{Duration, Instant};

use crate::cache::{self, Follower, Freshness, Lookup, ReplyKey};
use crate::engine::{EngineError, GenerationRequest, StageTimings, TokenEvent, TokenStream};
use crate::metrics::{CacheLabels, DegradeLabels, TierLabels};
use crate::router::{CacheMode, Route, TokenCounter};

use super::error::{retry_after_secs, ApiError};
use super::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradeReason {
    /// The tier's live queue state predicted a first token after the budget.
    PredictedTtft,
    /// The tier's queue was full.
    QueueFull,
    /// Admitted, but no first token came within the budget; the sequence was cancelled.
    TtftWatchdog,
}

impl DegradeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DegradeReason::PredictedTtft => "predicted_ttft",
            DegradeReason::QueueFull => "queue_full",
            DegradeReason::TtftWatchdog => "ttft_watchdog",
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
    /// Past its TTL, served because no tier could answer in time.
    Stale,
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheUse::Miss => "miss",
            CacheUse::Shared => "shared",
            CacheUse::Hit => "hit",
            CacheUse::Stale => "stale",
        }
    }

    /// Whether this response ran its own generation (and so counts its tokens).
    pub fn generated(self) -> bool {
        self == CacheUse::Miss
    }
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
        event.unwrap_or_else(|| {
            TokenEvent::Failed(EngineError::Decode(
                "the model thread ended the sequence without finishing it".into(),
            ))
        })
    }
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
    match route.cache {
        CacheMode::Off => false,
        CacheMode::Deterministic => cache::is_reproducible(&generation.sampling),
        CacheMode::Always => true,
    }
}

pub struct Attempt<'a> {
    pub state: &'a AppState,
    pub generation: &'a GenerationRequest,
    pub route: &'a Route,
    pub tokens: &'a (dyn TokenCounter + Sync),
    /// The API key, which scopes cached replies unless the route shares them.
    pub api_key: Option<&'a str>,
    pub deadlines: Deadlines,
}

impl Attempt<'_> {
    pub async fn acquire(self) -> Result<Acquired, ApiError> {
        let Attempt {
            state,
            generation,
            route,
            tokens,
            api_key,
            deadlines,
        } = self;
        let use_cache = cacheable(route, generation);
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
            state.degrade_path(&route.tier)
        };

        let first_token_by = deadlines.first_token;
        let mut left_because: Option<DegradeReason> = None;
        let mut shortest_overrun: Option<Duration> = None;
        let mut stale_candidates = Vec::new();
        for (index, tier) in path.iter().enumerate() {
            let degraded = left_because.map(|reason| Degradation {
                from: route.tier.clone(),
                to: tier.clone(),
                reason,
            });
            let engine = state.engine_for_tier(tier)?;
            let model = engine.info().id.clone();
            let key = use_cache.then(|| ReplyKey::new(generation, tier, scope));
            if let Some(key) = &key {
                match state.cache().lookup(key) {
                    Lookup::Fresh(reply) => {
                        return Ok(replay(state, &reply, tier, model, degraded, CacheUse::Hit))
                    }
                    Lookup::Stale(_) => stale_candidates.push((tier.clone(), key.clone())),
                    Lookup::Miss => {}
                }
            }

            let left = first_token_by.saturating_duration_since(Instant::now());
            // Token-count errors surface from `submit` with their proper status.
            let prompt_tokens = tokens.prompt_tokens(tier).unwrap_or(0);
            let predicted = engine.load().predict_ttft(prompt_tokens);
            if predicted > left {
                let overrun = predicted - left;
                shortest_overrun = Some(shortest_overrun.map_or(overrun, |s| s.min(overrun)));
                left_because = Some(DegradeReason::PredictedTtft);
                continue;
            }

            let joined = key.as_ref().and_then(|k| state.cache().join(k));
            let (mut source, cache_use) = match joined {
                Some(follower) => (Source::Shared(follower), Some(CacheUse::Shared)),
                None => match engine.submit(generation.clone()) {
                    Ok(stream) => match key {
                        Some(key) => (
                            Source::Shared(state.cache().lead(key, stream, freshness)),
                            Some(CacheUse::Miss),
                        ),
                        None => (Source::Engine(stream), None),
                    },
                    Err(EngineError::QueueFull { .. }) => {
                        left_because = Some(DegradeReason::QueueFull);
                        shortest_overrun.get_or_insert(predicted.max(Duration::from_secs(1)));
                        continue;
                    }
                    Err(err) => return Err(err.into()),
                },
            };
            let prompt_tokens = match &source {
                Source::Engine(stream) => stream.prompt_tokens,
                Source::Shared(follower) => follower.prompt_tokens,
                Source::Replay(_) => prompt_tokens,
            };
            let watchdog_at = first_token_by - hedge(state, tokens, path.get(index + 1), left);
            // The watchdog: the first token must arrive while the budget lasts.
            match tokio::time::timeout_at(watchdog_at.into(), source.next_event()).await {
                Ok(TokenEvent::Failed(err)) => return Err(err.into()),
                Ok(first) => {
                    if let Some(cache_use) = cache_use {
                        count_cache(state, tier, cache_use);
                    }
                    count_degradation(state, degraded.as_ref());
                    return Ok(Acquired {
                        source,
                        first,
                        tier: tier.clone(),
                        model,
                        prompt_tokens,
                        degraded,
                        cache: cache_use,
                    });
                }
                Err(_elapsed) => {
                    tracing::warn!(%tier, budget_ms = route.ttft_ms, "no first token in time: failing over");
                    // Dropping the source cancels the sequence (or leaves a shared one).
                    drop(source);
                    left_because = Some(DegradeReason::TtftWatchdog);
                    let overrun =
                        Duration::from_millis(route.ttft_ms / 2).max(Duration::from_secs(1));
                    shortest_overrun.get_or_insert(overrun);
                }
            }
        }

        // No tier can answer in time: an old reply beats an error.
        for (tier, key) in stale_candidates {
            if let Lookup::Stale(reply) | Lookup::Fresh(reply) = state.cache().lookup(&key) {
                let model = state.engine_for_tier(&tier)?.info().id.clone();
                let degraded = Some(Degradation {
                    from: route.tier.clone(),
                    to: tier.clone(),
                    reason: left_because.unwrap_or(DegradeReason::PredictedTtft),
                });
                return Ok(replay(
                    state,
                    &reply,
                    &tier,
                    model,
                    degraded,
                    CacheUse::Stale,
                ));
            }
        }
        state
            .metrics()
            .shed
            .get_or_create(&TierLabels {
                tier: route.tier.clone(),
            })
            .inc();
        let wait = shortest_overrun.unwrap_or(Duration::from_secs(1));
        Err(ApiError::overloaded(
            format!(
                "no tier can answer within this request's {} ms time-to-first-token budget now (tried {}); retry later",
                route.ttft_ms,
                path.join(", ")
            ),
            retry_after_secs(wait),
        ))
    }
}

/// How long before the first-token deadline the watchdog gives up on a tier, so that the
/// next tier on the path still has time to answer within the budget: twice that tier's
/// predicted TTFT now plus 50 ms (predictions are averages, and it must still pass its
/// own prediction check then), at most half of what is left. The last tier gets the
/// whole budget.
fn hedge(
    state: &AppState,
    tokens: &(dyn TokenCounter + Sync),
    next_tier: Option<&String>,
    left: Duration,
) -> Duration {
    let Some(next_tier) = next_tier else {
        return Duration::ZERO;
    };
    let Ok(engine) = state.engine_for_tier(next_tier) else {
        return Duration::ZERO;
    };
    let prompt_tokens = tokens.prompt_tokens(next_tier).unwrap_or(0);
    let predicted = engine.load().predict_ttft(prompt_tokens);
    (predicted * 2 + Duration::from_millis(50)).min(left / 2)
}

fn replay(
    state: &AppState,
    reply: &cache::CachedReply,
    tier: &str,
    model: String,
    degraded: Option<Degradation>,
    cache_use: CacheUse,
) -> Acquired {
    count_cache(state, tier, cache_use);
    count_degradation(state, degraded.as_ref());
    let mut events = reply.events().into_iter();
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
    }
}

fn count_cache(state: &AppState, tier: &str, cache_use: CacheUse) {
    state
        .metrics()
        .cache_lookups
        .get_or_create(&CacheLabels {
            tier: tier.to_owned(),
            outcome: cache_use.as_str().to_owned(),
        })
        .inc();
}

fn count_degradation(state: &AppState, degraded: Option<&Degradation>) {
    if let Some(d) = degraded {
        state
            .metrics()
            .degradations
            .get_or_create(&DegradeLabels {
                from: d.from.clone(),
                to: d.to.clone(),
                reason: d.reason.as_str().to_owned(),
            })
            .inc();
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
}
