//! One upstream endpoint's live state (requests in flight, observed time to first token,
//! health, circuit breaker), and the pure choice of an endpoint for a request.
//!
//! The shape follows SGLang's router: a small picker over the endpoints that are healthy
//! and whose breaker allows a call, and per-endpoint bookkeeping updated as each attempt
//! ends (`sgl-router/src/policies`, `core/circuit_breaker.rs`).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RemoteConfig;
use crate::engine::EndpointStatus;
use crate::metrics::EndpointMetrics;

/// Smoothing of the time-to-first-token average: each new measurement weighs this much.
const EWMA_WEIGHT: f64 = 0.2;

/// A circuit breaker over consecutive failures. Pure: the caller passes the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Taking traffic; `failures` in a row so far.
    Closed { failures: u32 },
    /// Ejected: no traffic until `until`.
    Open { until: Instant },
    /// The ejection ran out: one trial request decides (`trial_out` once it is sent).
    HalfOpen { trial_out: bool },
}

impl Breaker {
    /// Whether a request may be sent now.
    pub fn admits(&self, now: Instant) -> bool {
        match *self {
            Breaker::Closed { .. } => true,
            Breaker::Open { until } => now >= until,
            Breaker::HalfOpen { trial_out } => !trial_out,
        }
    }

    /// Claims the right to send a request now: `Some(true)` for the one trial after an
    /// ejection, `Some(false)` for ordinary traffic, `None` when refused.
    pub fn claim(&mut self, now: Instant) -> Option<bool> {
        match *self {
            Breaker::Closed { .. } => Some(false),
            Breaker::Open { until } if now < until => None,
            Breaker::HalfOpen { trial_out: true } => None,
            Breaker::Open { .. } | Breaker::HalfOpen { trial_out: false } => {
                *self = Breaker::HalfOpen { trial_out: true };
                Some(true)
            }
        }
    }

    /// A request answered. Only the trial closes an ejected endpoint's breaker: a request
    /// sent before the ejection says nothing about now.
    pub fn succeeded(&mut self, trial: bool) {
        match self {
            Breaker::Closed { .. } => *self = Breaker::Closed { failures: 0 },
            Breaker::HalfOpen { .. } if trial => *self = Breaker::Closed { failures: 0 },
            _ => {}
        }
    }

    /// A request failed; returns true when this failure ejects the endpoint.
    pub fn failed(
        &mut self,
        now: Instant,
        threshold: u32,
        eject_for: Duration,
        trial: bool,
    ) -> bool {
        let eject = match *self {
            Breaker::Closed { failures } if failures + 1 < threshold => {
                *self = Breaker::Closed {
                    failures: failures + 1,
                };
                false
            }
            Breaker::Closed { .. } => true,
            Breaker::HalfOpen { .. } => trial,
            // Already out: a request sent before the ejection failed late.
            Breaker::Open { .. } => false,
        };
        if eject {
            *self = Breaker::Open {
                until: now + eject_for,
            };
        }
        eject
    }

    /// A request ended without a verdict (its client left): a trial's turn is free again.
    pub fn abandoned(&mut self, trial: bool) {
        if trial && *self == (Breaker::HalfOpen { trial_out: true }) {
            *self = Breaker::HalfOpen { trial_out: false };
        }
    }
}

/// Failed health checks in a row that take an endpoint out of rotation: one slow answer
/// from a busy server must not.
const FAILED_CHECKS_TO_FAIL: u32 = 2;

/// What the endpoint's requests have shown, behind one lock.
#[derive(Debug)]
struct Observed {
    breaker: Breaker,
    /// Active health checks failed in a row.
    failed_checks: u32,
    /// `Late` attempts in a row with no first token between them.
    late_streak: u32,
    /// Smoothed seconds to first token, and the requests in flight (its own included)
    /// when those were measured; `None` until one was.
    ttft_s: Option<f64>,
    ttft_at_outstanding: f64,
    last_error: Option<String>,
}

impl Observed {
    fn failing_checks(&self) -> bool {
        self.failed_checks >= FAILED_CHECKS_TO_FAIL
    }

    fn fold_ttft(&mut self, sample: f64, at: f64) {
        match self.ttft_s {
            None => {
                self.ttft_s = Some(sample);
                self.ttft_at_outstanding = at;
            }
            Some(old) => {
                self.ttft_s = Some(old + EWMA_WEIGHT * (sample - old));
                self.ttft_at_outstanding += EWMA_WEIGHT * (at - self.ttft_at_outstanding);
            }
        }
    }
}

/// One base URL of a fleet.
#[derive(Debug)]
pub struct Endpoint {
    /// As configured, without a trailing slash: `http://10.0.0.5:8000/v1`.
    pub url: String,
    pub chat_url: String,
    /// The configured health path on the endpoint's base (its URL less a trailing `/v1`);
    /// `None`: no active checks.
    pub health_url: Option<String>,
    /// Requests sent and not yet ended. Read lock-free by the picker; changed under the
    /// `observed` lock so that claims cannot pass `max_outstanding` together.
    outstanding: AtomicU32,
    observed: Mutex<Observed>,
    /// Consecutive failures that eject it, and for how long.
    failure_threshold: u32,
    eject_for: Duration,
    metrics: EndpointMetrics,
}

/// What an ended attempt says about its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It answered (tokens, or a well-formed refusal of the client's request).
    Answered,
    /// It failed: refused the connection, errored, broke the stream, or no first token
    /// within the fleet's own `first_token_timeout_ms`.
    Failed(String),
    /// No first token within this request's share of its budget: the wait is a lower
    /// bound on its TTFT. Not a fault by itself (a busy replica is slow, not broken), but
    /// `failure_threshold` of them in a row with no first token between eject it: a
    /// replica that accepts requests and never answers must not keep taking them.
    Late,
    /// Said it is overloaded (429), or the connection closed as the request was sent
    /// (resent): neither a fault nor a measurement.
    Busy,
    /// The client left first (or the planner's watchdog gave up on the tier): a wait
    /// longer than the average is a lower bound on its TTFT; nothing else is learnt.
    Abandoned,
}

impl Endpoint {
    pub fn new(url: String, config: &RemoteConfig, metrics: EndpointMetrics) -> Self {
        let health_path = &config.health_path;
        let health_url = (!health_path.is_empty()).then(|| {
            let base = url.strip_suffix("/v1").unwrap_or(&url);
            format!("{base}{health_path}")
        });
        metrics.up.set(1);
        Self {
            chat_url: format!("{url}/chat/completions"),
            url,
            health_url,
            outstanding: AtomicU32::new(0),
            observed: Mutex::new(Observed {
                breaker: Breaker::Closed { failures: 0 },
                // Until its first check passes, one failure takes it out: an endpoint that
                // is down at start-up is not reported ready for a health interval.
                failed_checks: FAILED_CHECKS_TO_FAIL - 1,
                late_streak: 0,
                ttft_s: None,
                ttft_at_outstanding: 1.0,
                last_error: None,
            }),
            failure_threshold: config.failure_threshold,
            eject_for: Duration::from_millis(config.eject_ms),
            metrics,
        }
    }

    fn observed(&self) -> MutexGuard<'_, Observed> {
        // Plain data: a poisoned lock still holds a consistent value.
        self.observed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Passing its health checks (or not checked) and its breaker lets a request through.
    pub fn available(&self, now: Instant) -> bool {
        let observed = self.observed();
        !observed.failing_checks() && observed.breaker.admits(now)
    }

    /// Expected time to first token with `outstanding` requests in flight: the measured
    /// average, scaled by how many more are in flight now than when it was measured. A
    /// batching engine does better than this, and the budget planner's calibration learns
    /// by how much. Zero until measured.
    pub fn predict_ttft(&self) -> Duration {
        let observed = self.observed();
        let Some(ttft_s) = observed.ttft_s else {
            return Duration::ZERO;
        };
        let load = f64::from(self.outstanding() + 1) / observed.ttft_at_outstanding.max(1.0);
        Duration::from_secs_f64(ttft_s * load.max(1.0))
    }

    /// Sends a request if the endpoint may take one now (available, under
    /// `max_outstanding`): checked and claimed under one lock, so two requests cannot
    /// both become an ejected endpoint's trial or pass the cap together.
    pub fn try_begin(self: &Arc<Self>, max_outstanding: u32) -> Option<InFlight> {
        let now = Instant::now();
        let mut observed = self.observed();
        if observed.failing_checks() || self.outstanding() >= max_outstanding {
            return None;
        }
        let trial = observed.breaker.claim(now)?;
        let in_flight = self.outstanding.fetch_add(1, Ordering::Relaxed) + 1;
        drop(observed);
        self.metrics.outstanding.inc();
        Some(InFlight {
            endpoint: self.clone(),
            at_outstanding: in_flight,
            sent_at: now,
            trial,
            answered: false,
            verdict: None,
        })
    }

    /// The result of an active health check.
    pub fn checked(&self, healthy: Result<(), String>) {
        let mut observed = self.observed();
        match healthy {
            Ok(()) => observed.failed_checks = 0,
            Err(why) => {
                observed.failed_checks += 1;
                observed.last_error = Some(format!("health check: {why}"));
            }
        }
        drop(observed);
        self.publish(Instant::now());
    }

    /// Sets the `up` gauge from the state now (an ejection's end is not an event, so the
    /// health loop calls this on its schedule as well).
    pub fn publish(&self, now: Instant) {
        self.metrics.up.set(i64::from(self.available(now)));
    }

    pub fn status(&self, now: Instant) -> EndpointStatus {
        let observed = self.observed();
        let state = if observed.failing_checks() {
            "failing_checks"
        } else {
            match observed.breaker {
                Breaker::Closed { .. } => "healthy",
                Breaker::Open { until } if now < until => "ejected",
                Breaker::Open { .. } | Breaker::HalfOpen { .. } => "probing",
            }
        };
        EndpointStatus {
            url: self.url.clone(),
            state,
            outstanding: self.outstanding(),
            ttft_ms: observed.ttft_s.map(|s| s * 1000.0),
            last_error: observed.last_error.clone(),
        }
    }
}

/// One request in flight on an endpoint. Ending it (or dropping it) gives its place back
/// and tells the breaker what the attempt showed.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    /// Requests in flight when this one was sent, itself included.
    at_outstanding: u32,
    sent_at: Instant,
    /// The one request that decides whether an ejected endpoint is back.
    trial: bool,
    /// Its first token came (and the breaker was told at once).
    answered: bool,
    verdict: Option<(Verdict, &'static str)>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The first token came: the endpoint works (a trial closes the breaker now, not
    /// when a long reply ends), and the wait is a TTFT measurement.
    pub fn first_token(&mut self) {
        let ttft = self.sent_at.elapsed();
        let endpoint = &self.endpoint;
        endpoint.metrics.ttft.observe(ttft.as_secs_f64());
        let mut observed = endpoint.observed();
        observed.fold_ttft(ttft.as_secs_f64(), f64::from(self.at_outstanding));
        observed.breaker.succeeded(self.trial);
        // It serves: a health check that timed out while it was busy is outweighed.
        observed.failed_checks = 0;
        observed.late_streak = 0;
        drop(observed);
        self.answered = true;
        endpoint.publish(Instant::now());
    }

    /// How the attempt ended; `outcome` labels the request counter. The first call counts.
    pub fn end(&mut self, verdict: Verdict, outcome: &'static str) {
        self.verdict.get_or_insert((verdict, outcome));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let endpoint = &self.endpoint;
        let now = Instant::now();
        let (verdict, outcome) = self
            .verdict
            .take()
            .unwrap_or((Verdict::Abandoned, "client_closed"));
        endpoint.metrics.requests(outcome).inc();
        let mut observed = endpoint.observed();
        endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
        let waited = (now - self.sent_at).as_secs_f64();
        let (threshold, eject_for) = (endpoint.failure_threshold, endpoint.eject_for);
        // A failure, with the consecutive failures that eject for it.
        let failure = match verdict {
            Verdict::Answered => {
                observed.breaker.succeeded(self.trial);
                None
            }
            Verdict::Failed(why) => Some((why, threshold)),
            Verdict::Late => {
                // No first token by a deadline: a lower bound on its TTFT.
                if observed.ttft_s.is_none_or(|t| waited > t) {
                    observed.fold_ttft(waited, f64::from(self.at_outstanding));
                }
                observed.late_streak += 1;
                let streak = observed.late_streak;
                (streak >= threshold)
                    .then(|| (format!("no first token in {streak} attempts in a row"), 1))
            }
            Verdict::Busy => None,
            Verdict::Abandoned => {
                // Only a wait longer than what is known says something (a client that
                // leaves at once says nothing).
                if !self.answered && observed.ttft_s.is_some_and(|t| waited > t) {
                    observed.fold_ttft(waited, f64::from(self.at_outstanding));
                }
                None
            }
        };
        if let Some((why, threshold)) = failure {
            if observed
                .breaker
                .failed(now, threshold, eject_for, self.trial)
            {
                observed.late_streak = 0;
                endpoint.metrics.ejections.inc();
                tracing::warn!(endpoint = %endpoint.url, %why, eject_s = eject_for.as_secs_f64(),
                    "endpoint ejected after consecutive failures");
            }
            observed.last_error = Some(why);
        } else {
            // A trial that ended without a verdict (late, busy, left) frees the turn.
            observed.breaker.abandoned(self.trial);
        }
        drop(observed);
        endpoint.metrics.outstanding.dec();
        endpoint.publish(now);
    }
}

/// An endpoint as the picker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    pub outstanding: u32,
    pub predicted_ttft: Duration,
    /// Its rendezvous rank for this request's affinity key (higher is preferred).
    pub affinity_rank: u64,
    /// Fewer in flight than its configured `slots` (always, when none are configured): a
    /// new request would start at once instead of waiting in that server's own queue.
    pub has_room: bool,
}

/// The affinity's endpoint keeps its requests while it has at most this many more in
/// flight than the least loaded one (or a quarter more, when that is more): reusing a
/// warm prefix saves a prefill, but a request queued behind a replica's full slots waits
/// a whole reply. SGLang's cache-aware policy uses the same absolute-plus-relative test,
/// with thresholds sized for vLLM's large batches; llama-server replicas have few slots.
const AFFINITY_SLACK: u32 = 1;

/// Least requests in flight (then the lower predicted first token, then config order),
/// except that a request with an affinity key goes to its rendezvous endpoint while that
/// one is not much busier. Endpoints with a free slot go first: a request sent to a full
/// one waits in its queue for a whole reply. `candidates` are the endpoints that may
/// take a request now.
pub fn pick(candidates: &[Candidate], with_affinity: bool) -> Option<usize> {
    let any_room = candidates.iter().any(|c| c.has_room);
    let pool = || candidates.iter().filter(move |c| c.has_room || !any_room);
    let least = pool().min_by_key(|c| (c.outstanding, c.predicted_ttft, c.index))?;
    if with_affinity {
        let preferred = pool().max_by_key(|c| c.affinity_rank)?;
        let slack = AFFINITY_SLACK.max(least.outstanding / 4);
        if preferred.outstanding <= least.outstanding + slack {
            return Some(preferred.index);
        }
    }
    Some(least.index)
}

/// Rendezvous (highest random weight) rank of `url` for `key`: each key prefers one
/// endpoint, and removing an endpoint moves only the keys that preferred it.
pub fn affinity_rank(key: u64, url: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    url.hash(&mut hasher);
    hasher.finish()
}

/// What decides where a conversation's KV cache lives upstream: its first message (the
/// system prompt, or the opening user turn), which every later turn repeats.
pub fn affinity_key(first_message: &str, role: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    role.hash(&mut hasher);
    first_message.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(index: usize, outstanding: u32, affinity_rank: u64) -> Candidate {
        Candidate {
            index,
            outstanding,
            predicted_ttft: Duration::ZERO,
            affinity_rank,
            has_room: true,
        }
    }

    #[test]
    fn endpoints_with_a_free_slot_go_first_even_against_affinity() {
        let mut full = candidate(0, 8, 9);
        full.has_room = false;
        let other = candidate(1, 8, 1);
        assert_eq!(pick(&[full, other], true), Some(1));
        // All full: least in flight, as without slots.
        let mut other_full = candidate(1, 9, 1);
        other_full.has_room = false;
        assert_eq!(pick(&[full, other_full], false), Some(0));
    }

    #[test]
    fn the_least_loaded_endpoint_wins_without_affinity() {
        let endpoints = [candidate(0, 3, 9), candidate(1, 1, 0), candidate(2, 1, 5)];
        assert_eq!(pick(&endpoints, false), Some(1));
        assert_eq!(pick(&[], false), None);
    }

    #[test]
    fn ties_go_to_the_faster_endpoint() {
        let mut slow = candidate(0, 0, 0);
        slow.predicted_ttft = Duration::from_millis(300);
        let mut fast = candidate(1, 0, 0);
        fast.predicted_ttft = Duration::from_millis(100);
        assert_eq!(pick(&[slow, fast], false), Some(1));
    }

    #[test]
    fn affinity_holds_while_the_preferred_endpoint_is_not_much_busier() {
        // Preferred (rank 9) has 1 more in flight than the least loaded: within the slack.
        let near = [candidate(0, 1, 9), candidate(1, 0, 1)];
        assert_eq!(pick(&near, true), Some(0));
        // Two more: the request goes to the least loaded.
        let far = [candidate(0, 2, 9), candidate(1, 0, 1)];
        assert_eq!(pick(&far, true), Some(1));
        // At higher load the slack is a quarter of the least load: 24 against 20 stays.
        let busy = [candidate(0, 24, 9), candidate(1, 20, 1)];
        assert_eq!(pick(&busy, true), Some(0));
        let busier = [candidate(0, 26, 9), candidate(1, 20, 1)];
        assert_eq!(pick(&busier, true), Some(1));
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_endpoint() {
        let urls = ["http://a/v1", "http://b/v1", "http://c/v1"];
        let best = |key: u64, urls: &[&str]| {
            urls.iter()
                .max_by_key(|u| affinity_rank(key, u))
                .map(|u| u.to_string())
        };
        let mut moved = 0;
        let mut spread = std::collections::HashMap::new();
        for key in 0..300u64 {
            let before = best(key, &urls).expect("one");
            *spread.entry(before.clone()).or_insert(0) += 1;
            let after = best(key, &urls[..2]).expect("one");
            if before != after {
                assert_eq!(before, urls[2], "only c's keys move");
                moved += 1;
            }
        }
        assert!(moved > 50, "c held a fair share: {moved}");
        assert!(spread.values().all(|&n| n > 50), "{spread:?}");
    }

    #[test]
    fn consecutive_failures_eject_and_one_trial_decides_after_the_wait() {
        let start = Instant::now();
        let eject = Duration::from_secs(10);
        let mut breaker = Breaker::Closed { failures: 0 };
        assert!(!breaker.failed(start, 3, eject, false));
        assert!(!breaker.failed(start, 3, eject, false));
        assert_eq!(breaker.claim(start), Some(false));
        assert!(breaker.failed(start, 3, eject, false), "the third ejects");
        assert_eq!(breaker.claim(start + Duration::from_secs(9)), None);
        let later = start + eject;
        assert!(breaker.admits(later));
        assert_eq!(breaker.claim(later), Some(true), "the trial");
        assert_eq!(breaker.claim(later), None, "one trial at a time");
        // A request sent before the ejection ends well: it says nothing about now.
        breaker.succeeded(false);
        assert_eq!(breaker, Breaker::HalfOpen { trial_out: true });
        // The trial fails: out again for the whole wait.
        assert!(breaker.failed(later, 3, eject, true));
        assert_eq!(breaker.claim(later + Duration::from_secs(9)), None);
        let again = later + eject;
        assert_eq!(breaker.claim(again), Some(true));
        breaker.succeeded(true);
        assert_eq!(breaker, Breaker::Closed { failures: 0 });
    }

    #[test]
    fn a_success_resets_the_count_and_an_abandoned_trial_frees_the_turn() {
        let now = Instant::now();
        let mut breaker = Breaker::Closed { failures: 0 };
        breaker.failed(now, 2, Duration::from_secs(1), false);
        breaker.succeeded(false);
        assert!(
            !breaker.failed(now, 2, Duration::from_secs(1), false),
            "count restarted"
        );

        let mut trial = Breaker::HalfOpen { trial_out: true };
        trial.abandoned(false);
        assert!(!trial.admits(now), "only the trial's own end frees it");
        trial.abandoned(true);
        assert!(trial.admits(now));
        // A late failure of an older request does not re-eject a probing endpoint.
        let mut probing = Breaker::HalfOpen { trial_out: true };
        assert!(!probing.failed(now, 1, Duration::from_secs(1), false));
    }
}
