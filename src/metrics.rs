//! Prometheus metrics, rendered by `prometheus-client` (no hand-written exposition text).
//!
//! Engines get [`EngineMetrics`] bound to their own labels and update them from the step
//! loop; the gateway records per-request figures (`gateway::Outcome`, in one place).

use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::sync::{PoisonError, RwLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub tier: String,
    /// HTTP status of the outcome; `stream_error` for a failure after streaming began,
    /// `client_closed` for a client that left mid-stream.
    pub status: String,
    /// `stop` or `length` for a finished reply, `abort` for one the client left,
    /// `error` for a failure, `none` for a request refused before generating.
    pub finish_reason: String,
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
    /// `predicted_ttft`, `queue_full`, `ttft_watchdog`, `unavailable` (loading or down) or
    /// `context_length` (the prompt does not fit the routed tier).
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub tier: String,
    /// `hit`, `semantic` (a reply to a question that means the same), `stale` (served past
    /// its TTL because no tier could answer in time),
    /// `shared` (joined an identical running generation) or `miss`.
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SemanticLabels {
    pub tier: String,
    /// `hit`, `refused` (the closest question over the threshold failed a look-alike
    /// guard) or `miss`.
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    /// `numbers`, `negation`, `opposites` or `names`.
    pub guard: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: String,
}

/// One endpoint of a remote model's fleet.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub model: String,
    pub tier: String,
    /// The endpoint's base URL as configured.
    pub endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointOutcomeLabels {
    pub model: String,
    pub tier: String,
    pub endpoint: String,
    /// `ok`; `rejected` (a 4xx that is the client's to fix); `client_closed`; or a
    /// failure: `connect_error`, `send_error`, `http_<status>`, `first_token_timeout`,
    /// `stalled`, `dropped_mid_stream`, `error_event`, `malformed`.
    pub outcome: String,
}

// Explicit buckets per histogram, each over the range its quantity spans on CPU and GPU
// alike: some exporters turn bucket-less histograms into summaries, which
// `histogram_quantile` cannot aggregate.

/// Time to first token spans prefill on a loaded CPU: from a few ms to tens of seconds.
const TTFT_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0,
];
/// One decode step: milliseconds on a GPU, tens to hundreds of ms for a full CPU batch.
const INTER_TOKEN_BUCKETS: [f64; 14] = [
    0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
/// Whole replies: a cached one in a millisecond, a long one in minutes.
const E2E_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Waiting for a slot: nothing when idle, the budget's order when busy.
const QUEUE_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Prompt prefill plus the first step: a few ms for short prompts, seconds for long ones.
const PREFILL_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];
/// Sequences in one decode call, up to the 256-slot maximum.
const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0, 128.0, 256.0,
];

/// Cosine similarity of the closest cached question (semantic lookups).
const SIMILARITY_BUCKETS: [f64; 12] = [
    0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.93, 0.96, 0.99,
];

/// Texts in one embedding forward pass.
const EMBED_BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// One embedding forward pass on CPU: a few ms alone, tens of ms for a batch.
const EMBED_SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.004, 0.008, 0.012, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Observed over predicted TTFT: how far off a prediction was, either way.
const RATIO_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0,
];

fn histograms(buckets: &'static [f64]) -> Histograms {
    Family::new_with_constructor(HistogramMaker(buckets))
}

/// Builds each labelled histogram of a family with the family's buckets.
#[derive(Clone)]
pub struct HistogramMaker(&'static [f64]);

impl MetricConstructor<Histogram> for HistogramMaker {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

type Histograms = Family<ModelLabels, Histogram, HistogramMaker>;

/// A family whose series are found by borrowed label values.
///
/// `Family::get_or_create` takes owned labels and hashes them with SipHash under its lock:
/// on a reply-cache hit, building and hashing labels for five series was about 2% of the
/// gateway's CPU. The label sets a request reaches are few (models, tiers, rules,
/// outcomes), so a short list searched by comparison finds a series with no allocation.
/// The series live in the family as before, so `/metrics` shows the same; this keeps
/// handles to them.
pub struct Indexed<S, M, C, const N: usize> {
    family: Family<S, M, C>,
    labels: fn([&str; N]) -> S,
    known: RwLock<Vec<([Box<str>; N], M)>>,
}

/// Label sets beyond this many are looked up in the family each time (still counted right).
const MAX_INDEXED: usize = 256;

impl<S, M, C, const N: usize> Indexed<S, M, C, N>
where
    S: Clone + Hash + Eq,
    M: Clone,
    C: MetricConstructor<M>,
{
    fn new(family: Family<S, M, C>, labels: fn([&str; N]) -> S) -> Self {
        Self {
            family,
            labels,
            known: RwLock::new(Vec::new()),
        }
    }

    /// The series with these label values, created on first use.
    pub fn get(&self, values: [&str; N]) -> M {
        let same = |known: &[Box<str>; N]| known.iter().map(|v| &**v).eq(values);
        let full = {
            let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, metric)) = known.iter().find(|(k, _)| same(k)) {
                return metric.clone();
            }
            known.len() >= MAX_INDEXED
        };
        let metric = self.family.get_or_create(&(self.labels)(values)).clone();
        // A full index is left alone: no write lock for label sets it will not keep.
        if full {
            return metric;
        }
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        if known.len() < MAX_INDEXED && !known.iter().any(|(k, _)| same(k)) {
            known.push((values.map(Box::from), metric.clone()));
        }
        metric
    }
}

impl<M, C> Indexed<ModelLabels, M, C, 2>
where
    M: Clone,
    C: MetricConstructor<M>,
{
    /// The series of one model.
    pub fn of(&self, labels: &ModelLabels) -> M {
        self.get([&labels.model, &labels.tier])
    }
}

fn model_labels([model, tier]: [&str; 2]) -> ModelLabels {
    ModelLabels {
        model: model.to_owned(),
        tier: tier.to_owned(),
    }
}

pub struct Metrics {
    registry: Registry,
    active_sequences: Family<ModelLabels, Gauge>,
    waiting_requests: Family<ModelLabels, Gauge>,
    free_slots: Family<ModelLabels, Gauge>,
    kv_cache_usage: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    batch_sequences_max: Family<ModelLabels, Gauge>,
    queue_time: Histograms,
    prefill_time: Histograms,
    batch_size: Histograms,
    prefix_cache_tokens: Family<ModelLabels, Counter>,
    prompt_count_mismatches: Family<ModelLabels, Counter>,
    model_up: Family<ModelLabels, Gauge>,
    pub time_to_first_token: Indexed<ModelLabels, Histogram, HistogramMaker, 2>,
    pub inter_token_latency: Indexed<ModelLabels, Histogram, HistogramMaker, 2>,
    pub e2e_request_latency: Indexed<ModelLabels, Histogram, HistogramMaker, 2>,
    /// By `[model, tier, status, finish_reason]`.
    pub requests: Indexed<RequestLabels, Counter, fn() -> Counter, 4>,
    pub generated_tokens: Indexed<ModelLabels, Counter, fn() -> Counter, 2>,
    pub prompt_tokens: Indexed<ModelLabels, Counter, fn() -> Counter, 2>,
    /// By `[tier, rule]`.
    pub route_decisions: Indexed<RouteLabels, Counter, fn() -> Counter, 2>,
    pub policy_reloads: Family<OutcomeLabels, Counter>,
    pub degradations: Family<DegradeLabels, Counter>,
    /// By `[tier, outcome]`.
    pub cache_lookups: Indexed<CacheLabels, Counter, fn() -> Counter, 2>,
    pub cache_evictions: Counter,
    pub rate_limited: Family<ReasonLabels, Counter>,
    pub shed: Family<TierLabels, Counter>,
    pub budget_cuts: Family<TierLabels, Counter>,
    /// Observed over predicted time to first token, per tier.
    pub ttft_prediction_ratio: Family<TierLabels, Histogram, HistogramMaker>,
    pub semantic_lookups: Family<SemanticLabels, Counter>,
    pub semantic_refusals: Family<GuardLabels, Counter>,
    pub semantic_similarity: Histogram,
    pub embedding_batch_size: Histogram,
    pub embedding_seconds: Histogram,
    upstream_requests: Family<EndpointOutcomeLabels, Counter>,
    upstream_ttft: Family<EndpointLabels, Histogram, HistogramMaker>,
    upstream_outstanding: Family<EndpointLabels, Gauge>,
    upstream_up: Family<EndpointLabels, Gauge>,
    upstream_ejections: Family<EndpointLabels, Counter>,
    /// Attempts moved to another endpoint of the same fleet before the first token.
    pub upstream_retries: Family<ModelLabels, Counter>,
}

/// One fleet endpoint's metrics, bound to its labels.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    labels: EndpointLabels,
    requests: Family<EndpointOutcomeLabels, Counter>,
    /// From sending the request to the first token of text.
    pub ttft: Histogram,
    pub outstanding: Gauge,
    /// 1 while the endpoint may be sent requests (healthy, not ejected).
    pub up: Gauge,
    pub ejections: Counter,
}

impl EndpointMetrics {
    /// The counter of attempts on this endpoint that ended with `outcome`.
    pub fn requests(&self, outcome: &str) -> Counter {
        let EndpointLabels {
            model,
            tier,
            endpoint,
        } = &self.labels;
        self.requests
            .get_or_create(&EndpointOutcomeLabels {
                model: model.clone(),
                tier: tier.clone(),
                endpoint: endpoint.clone(),
                outcome: outcome.to_owned(),
            })
            .clone()
    }
}

/// The gauges one model's step loop owns, already bound to its labels.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// Sequences admitted to a slot (prefilling or generating).
    pub active_sequences: Gauge,
    /// Requests accepted but not yet admitted.
    pub waiting_requests: Gauge,
    /// The largest number of sequences seen in one decode call.
    pub batch_sequences_max: Gauge,
    pub free_slots: Gauge,
    /// Share of the KV cells holding a live sequence's tokens, 0 to 1.
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    /// From `submit` to a slot.
    pub queue_time: Histogram,
    /// From the slot to the first sampled token.
    pub prefill_time: Histogram,
    /// Sequences in each decode call.
    pub batch_size: Histogram,
    /// Prompt tokens whose KV cells were reused instead of prefilled.
    pub prefix_cache_tokens: Counter,
    /// Requests whose prompt the router's Rust tokenizer counted differently from llama.cpp.
    pub prompt_count_mismatches: Counter,
    /// 1 while the model serves, 0 while it loads or after its thread ended.
    pub up: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers each metric as it is built, so a metric cannot be built and forgotten.
struct Registering(Registry);

impl Registering {
    fn add<M: EncodeMetric + Clone + std::fmt::Debug + Send + Sync + 'static>(
        &mut self,
        name: &str,
        help: &str,
        metric: M,
    ) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    fn seconds<M: EncodeMetric + Clone + std::fmt::Debug + Send + Sync + 'static>(
        &mut self,
        name: &str,
        help: &str,
        metric: M,
    ) -> M {
        self.0
            .register_with_unit(name, help, Unit::Seconds, metric.clone());
        metric
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registering(Registry::with_prefix("tiergate"));
        Self {
            active_sequences: r.add(
                "active_sequences",
                "Sequences holding a slot (prefilling or generating)",
                Family::default(),
            ),
            waiting_requests: r.add(
                "waiting_requests",
                "Requests accepted but not yet admitted to a slot",
                Family::default(),
            ),
            batch_sequences_max: r.add(
                "batch_sequences_max",
                "Largest number of sequences decoded together in one step since start",
                Family::default(),
            ),
            free_slots: r.add("free_slots", "Slots free for a new sequence", Family::default()),
            kv_cache_usage: r.add(
                "kv_cache_usage_ratio",
                "Share of the KV cache cells holding live sequences' tokens (0 to 1)",
                Family::default(),
            ),
            time_to_first_token: Indexed::new(
                r.seconds(
                    "time_to_first_token",
                    "Time from accepting a request to its first generated token",
                    histograms(&TTFT_BUCKETS),
                ),
                model_labels,
            ),
            inter_token_latency: Indexed::new(
                r.seconds(
                    "inter_token_latency",
                    "Time between consecutive streamed pieces of generated text",
                    histograms(&INTER_TOKEN_BUCKETS),
                ),
                model_labels,
            ),
            e2e_request_latency: Indexed::new(
                r.seconds(
                    "e2e_request_latency",
                    "Time from accepting a request to its last token",
                    histograms(&E2E_BUCKETS),
                ),
                model_labels,
            ),
            queue_time: r.seconds(
                "queue_time",
                "Time from entering a model's queue to getting a slot",
                histograms(&QUEUE_BUCKETS),
            ),
            prefill_time: r.seconds(
                "prefill_time",
                "Time from getting a slot to the first sampled token (prompt prefill)",
                histograms(&PREFILL_BUCKETS),
            ),
            batch_size: r.add(
                "batch_size",
                "Sequences decoded together in one decode call",
                histograms(&BATCH_SIZE_BUCKETS),
            ),
            prefix_cache_tokens: r.add(
                "prefix_cache_tokens",
                "Prompt tokens whose KV cells were reused from a slot's previous sequence instead of prefilled",
                Family::default(),
            ),
            prompt_count_mismatches: r.add(
                "prompt_token_count_mismatches",
                "Requests whose prompt tokens the router counted differently from llama.cpp's tokenizer (expected 0)",
                Family::default(),
            ),
            model_up: r.add(
                "model_up",
                "1 while a model serves requests; 0 while it loads or after its thread failed, panicked or stopped",
                Family::default(),
            ),
            requests: Indexed::new(
                r.add(
                    "requests",
                    "Chat completion requests by outcome",
                    Family::default(),
                ),
                |[model, tier, status, finish_reason]| RequestLabels {
                    model: model.to_owned(),
                    tier: tier.to_owned(),
                    status: status.to_owned(),
                    finish_reason: finish_reason.to_owned(),
                },
            ),
            generated_tokens: Indexed::new(
                r.add("generation_tokens", "Tokens generated", Family::default()),
                model_labels,
            ),
            prompt_tokens: Indexed::new(
                r.add("prompt_tokens", "Prompt tokens processed", Family::default()),
                model_labels,
            ),
            route_decisions: Indexed::new(
                r.add(
                    "route_decisions",
                    "Requests routed, by chosen tier and the policy rule that chose it",
                    Family::default(),
                ),
                |[tier, rule]| RouteLabels {
                    tier: tier.to_owned(),
                    rule: rule.to_owned(),
                },
            ),
            policy_reloads: r.add(
                "policy_reloads",
                "Routing policy reloads by outcome (applied, rejected)",
                Family::default(),
            ),
            degradations: r.add(
                "degradations",
                "Requests served by a smaller tier or the cache than routed, by reason",
                Family::default(),
            ),
            cache_lookups: Indexed::new(
                r.add(
                    "cache_lookups",
                    "Reply cache lookups of cacheable requests by outcome (hit, stale, shared, miss)",
                    Family::default(),
                ),
                |[tier, outcome]| CacheLabels {
                    tier: tier.to_owned(),
                    outcome: outcome.to_owned(),
                },
            ),
            cache_evictions: r.add(
                "cache_evictions",
                "Cached replies evicted to stay within the entry and byte bounds",
                Counter::default(),
            ),
            rate_limited: r.add(
                "rate_limited",
                "Requests refused by an API key's quota (429) or for a missing/unknown key (401)",
                Family::default(),
            ),
            shed: r.add(
                "shed",
                "Requests refused with 503 because no tier could answer within the budget",
                Family::default(),
            ),
            budget_cuts: r.add(
                "budget_cuts",
                "Replies ended with finish_reason length because the total budget ran out",
                Family::default(),
            ),
            ttft_prediction_ratio: r.add(
                "ttft_prediction_ratio",
                "Observed over predicted time to first token per tier (1 is exact; a watchdog cancel counts the time waited)",
                Family::new_with_constructor(HistogramMaker(&RATIO_BUCKETS)),
            ),
            semantic_lookups: r.add(
                "semantic_cache_lookups",
                "Semantic reply cache lookups (after an exact miss) by outcome: hit, refused by a look-alike guard, miss",
                Family::default(),
            ),
            semantic_refusals: r.add(
                "semantic_cache_guard_refusals",
                "Semantic hits refused because the questions differ in numbers, negation, opposite words or names",
                Family::default(),
            ),
            semantic_similarity: r.add(
                "semantic_cache_similarity",
                "Cosine similarity of the closest cached question, per semantic lookup that had one",
                Histogram::new(SIMILARITY_BUCKETS.iter().copied()),
            ),
            embedding_batch_size: r.add(
                "embedding_batch_size",
                "Texts embedded together in one forward pass",
                Histogram::new(EMBED_BATCH_BUCKETS.iter().copied()),
            ),
            embedding_seconds: r.seconds(
                "embedding_forward",
                "Time of one embedding forward pass (a whole batch)",
                Histogram::new(EMBED_SECONDS_BUCKETS.iter().copied()),
            ),
            upstream_requests: r.add(
                "upstream_requests",
                "Attempts sent to a remote endpoint, by how they ended",
                Family::default(),
            ),
            upstream_ttft: r.seconds(
                "upstream_time_to_first_token",
                "Time from sending a request to a remote endpoint to its first token of text",
                Family::new_with_constructor(HistogramMaker(&TTFT_BUCKETS)),
            ),
            upstream_outstanding: r.add(
                "upstream_outstanding_requests",
                "Requests in flight on a remote endpoint",
                Family::default(),
            ),
            upstream_up: r.add(
                "upstream_up",
                "1 while a remote endpoint takes requests; 0 while it fails its health check or is ejected",
                Family::default(),
            ),
            upstream_ejections: r.add(
                "upstream_ejections",
                "Times a remote endpoint was ejected (circuit opened) after consecutive failures",
                Family::default(),
            ),
            upstream_retries: r.add(
                "upstream_retries",
                "Requests moved to another endpoint of the same fleet before their first token",
                Family::default(),
            ),
            registry: r.0,
        }
    }

    pub fn engine_metrics(&self, labels: &ModelLabels) -> EngineMetrics {
        EngineMetrics {
            active_sequences: self.active_sequences.get_or_create(labels).clone(),
            waiting_requests: self.waiting_requests.get_or_create(labels).clone(),
            batch_sequences_max: self.batch_sequences_max.get_or_create(labels).clone(),
            free_slots: self.free_slots.get_or_create(labels).clone(),
            kv_cache_usage: self.kv_cache_usage.get_or_create(labels).clone(),
            queue_time: self.queue_time.get_or_create(labels).clone(),
            prefill_time: self.prefill_time.get_or_create(labels).clone(),
            batch_size: self.batch_size.get_or_create(labels).clone(),
            prefix_cache_tokens: self.prefix_cache_tokens.get_or_create(labels).clone(),
            prompt_count_mismatches: self.prompt_count_mismatches.get_or_create(labels).clone(),
            up: self.model_up.get_or_create(labels).clone(),
        }
    }

    pub fn endpoint_metrics(&self, labels: &EndpointLabels) -> EndpointMetrics {
        EndpointMetrics {
            labels: labels.clone(),
            requests: self.upstream_requests.clone(),
            ttft: self.upstream_ttft.get_or_create(labels).clone(),
            outstanding: self.upstream_outstanding.get_or_create(labels).clone(),
            up: self.upstream_up.get_or_create(labels).clone(),
            ejections: self.upstream_ejections.get_or_create(labels).clone(),
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
    fn indexed_series_are_the_familys_by_label_order_and_past_the_cap() {
        let family: Family<RouteLabels, Counter> = Family::default();
        let routes = Indexed::new(family.clone(), |[tier, rule]| RouteLabels {
            tier: tier.to_owned(),
            rule: rule.to_owned(),
        });
        let count = |tier: &str, rule: &str| {
            family
                .get_or_create(&RouteLabels {
                    tier: tier.into(),
                    rule: rule.into(),
                })
                .get()
        };
        routes.get(["fast", "code"]).inc();
        routes.get(["fast", "code"]).inc();
        routes.get(["code", "fast"]).inc();
        assert_eq!((count("fast", "code"), count("code", "fast")), (2, 1));
        // Past the cap, label sets are counted through the family alone.
        for n in 0..MAX_INDEXED + 8 {
            routes.get(["full", &n.to_string()]).inc();
        }
        routes.get(["full", &(MAX_INDEXED + 7).to_string()]).inc();
        assert_eq!(count("full", &(MAX_INDEXED + 7).to_string()), 2);
        assert_eq!(count("full", "0"), 1);
        let indexed = routes.known.read().map(|known| known.len()).unwrap_or(0);
        assert_eq!(indexed, MAX_INDEXED);
        routes.get(["fast", "code"]).inc();
        assert_eq!(
            count("fast", "code"),
            3,
            "an indexed series still counts once full"
        );
    }

    #[test]
    fn engine_gauges_appear_with_model_labels() {
        let metrics = Metrics::new();
        let gauges = metrics.engine_metrics(&ModelLabels {
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
