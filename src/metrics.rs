//! Prometheus metrics, rendered by `prometheus-client` (no hand-written exposition text).
//!
//! Engines get [`EngineGauges`] bound to their own labels and update them from the step
//! loop; the HTTP layer records per-request figures.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub tier: String,
    /// HTTP status class of the outcome, or `stream_error` for a failure after streaming began.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub tier: String,
    pub rule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradeLabels {
    pub from: String,
    pub to: String,
    /// `predicted_ttft`, `queue_full` or `ttft_watchdog`.
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub tier: String,
    /// `hit`, `stale` (served past its TTL because no tier could answer in time),
    /// `shared` (joined an identical running generation) or `miss`.
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: String,
}

/// Time to first token spans prefill on a loaded CPU: from a few ms to tens of seconds.
const TTFT_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    active_sequences: Family<ModelLabels, Gauge>,
    waiting_requests: Family<ModelLabels, Gauge>,
    batch_sequences_max: Family<ModelLabels, Gauge>,
    pub time_to_first_token: Family<ModelLabels, Histogram>,
    pub requests: Family<RequestLabels, Counter>,
    pub generated_tokens: Family<ModelLabels, Counter>,
    pub prompt_tokens: Family<ModelLabels, Counter>,
    pub route_decisions: Family<RouteLabels, Counter>,
    pub policy_reloads: Family<OutcomeLabels, Counter>,
    pub degradations: Family<DegradeLabels, Counter>,
    pub cache_lookups: Family<CacheLabels, Counter>,
    pub cache_evictions: Counter,
    pub rate_limited: Family<ReasonLabels, Counter>,
    pub shed: Family<TierLabels, Counter>,
    pub budget_cuts: Family<TierLabels, Counter>,
}

/// The gauges one model's step loop owns, already bound to its labels.
#[derive(Clone, Debug)]
pub struct EngineGauges {
    /// Sequences admitted to a slot (prefilling or generating).
    pub active_sequences: Gauge,
    /// Requests accepted but not yet admitted.
    pub waiting_requests: Gauge,
    /// The largest number of sequences seen in one decode call.
    pub batch_sequences_max: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tiergate");
        let active_sequences = Family::<ModelLabels, Gauge>::default();
        let waiting_requests = Family::<ModelLabels, Gauge>::default();
        let batch_sequences_max = Family::<ModelLabels, Gauge>::default();
        let time_to_first_token = Family::<ModelLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(TTFT_BUCKETS)) as fn() -> Histogram,
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let generated_tokens = Family::<ModelLabels, Counter>::default();
        let prompt_tokens = Family::<ModelLabels, Counter>::default();
        let route_decisions = Family::<RouteLabels, Counter>::default();
        let policy_reloads = Family::<OutcomeLabels, Counter>::default();
        let degradations = Family::<DegradeLabels, Counter>::default();
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        let cache_evictions = Counter::default();
        let rate_limited = Family::<ReasonLabels, Counter>::default();
        let shed = Family::<TierLabels, Counter>::default();
        let budget_cuts = Family::<TierLabels, Counter>::default();

        registry.register(
            "active_sequences",
            "Sequences holding a slot (prefilling or generating)",
            active_sequences.clone(),
        );
        registry.register(
            "waiting_requests",
            "Requests accepted but not yet admitted to a slot",
            waiting_requests.clone(),
        );
        registry.register(
            "batch_sequences_max",
            "Largest number of sequences decoded together in one step since start",
            batch_sequences_max.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Time from accepting a request to its first generated token",
            prometheus_client::registry::Unit::Seconds,
            time_to_first_token.clone(),
        );
        registry.register(
            "requests",
            "Chat completion requests by outcome",
            requests.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );

        registry.register(
            "route_decisions",
            "Requests routed, by chosen tier and the policy rule that chose it",
            route_decisions.clone(),
        );
        registry.register(
            "policy_reloads",
            "Routing policy reloads by outcome (applied, rejected)",
            policy_reloads.clone(),
        );

        registry.register(
            "degradations",
            "Requests served by a smaller tier or the cache than routed, by reason",
            degradations.clone(),
        );
        registry.register(
            "cache_lookups",
            "Reply cache lookups of cacheable requests by outcome (hit, stale, shared, miss)",
            cache_lookups.clone(),
        );
        registry.register(
            "cache_evictions",
            "Cached replies evicted to stay within the entry and byte bounds",
            cache_evictions.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by an API key's quota (429) or for a missing/unknown key (401)",
            rate_limited.clone(),
        );
        registry.register(
            "shed",
            "Requests refused with 503 because no tier could answer within the budget",
            shed.clone(),
        );
        registry.register(
            "budget_cuts",
            "Replies ended with finish_reason length because the total budget ran out",
            budget_cuts.clone(),
        );

        Self {
            registry,
            active_sequences,
            waiting_requests,
            batch_sequences_max,
            time_to_first_token,
            requests,
            generated_tokens,
            prompt_tokens,
            route_decisions,
            policy_reloads,
            degradations,
            cache_lookups,
            cache_evictions,
            rate_limited,
            shed,
            budget_cuts,
        }
    }

    pub fn engine_gauges(&self, labels: &ModelLabels) -> EngineGauges {
        EngineGauges {
            active_sequences: self.active_sequences.get_or_create(labels).clone(),
            waiting_requests: self.waiting_requests.get_or_create(labels).clone(),
            batch_sequences_max: self.batch_sequences_max.get_or_create(labels).clone(),
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_gauges_appear_with_model_labels() {
        let metrics = Metrics::new();
        let gauges = metrics.engine_gauges(&ModelLabels {
            model: "m".into(),
            tier: "fast".into(),
        });
        gauges.active_sequences.set(3);
        let text = metrics.render();
        assert!(
            text.contains(r#"tiergate_active_sequences{model="m",tier="fast"} 3"#),
            "{text}"
        );
    }
}
