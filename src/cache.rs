//! Exact-match reply cache, and sharing of identical generations while they run.
//!
//! ```text
//! lookup(key) ─ fresh ─► replay the stored pieces
//!      │ miss
//!      ▼
//! join(key) ─ someone is generating it ─► follow their event log from the start
//!      │ nobody
//!      ▼
//! lead: one engine stream pumped into a shared log by a task; on success the reply is stored
//! ```
//!
//! A shared generation is cancelled (its sequence leaves the engine) as soon as its last
//! follower goes away, so a timed-out or disconnected client never keeps a slot busy.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
// tokio's clock, so that TTLs pass under a paused test clock as they do in real time.
use tokio::time::Instant;

use crate::chat::{ChatMessage, ReplyFormat, Role, SamplingParams, ToolSpec};
use crate::embed::Embedding;
use crate::engine::{
    EngineError, FinishReason, GenerationRequest, StageTimings, TokenEvent, TokenStream, Usage,
};
use crate::semantic::SemanticIndex;

/// Everything that shapes a reply. Built by destructuring the request without `..`, so
/// a new request field does not compile until someone decides whether it belongs here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplyKey {
    /// The API key the reply belongs to; `None` for routes whose cache is shared.
    scope: Option<String>,
    /// The model (backend id) that generates it: models sharing a tier differ.
    model: String,
    messages: Vec<(Role, String)>,
    /// Floats by their bits: the key needs `Eq`, and equal requests have equal bits.
    temperature: u32,
    top_p: u32,
    top_k: u32,
    seed: Option<u32>,
    presence_penalty: u32,
    frequency_penalty: u32,
    max_tokens: Option<u32>,
    max_tokens_cap: Option<u32>,
    stop: Vec<String>,
    ignore_eos: bool,
    /// Token ids and bias bits.
    logit_bias: Vec<(i32, u32)>,
    /// A reply made without a schema must not answer a request with one, nor the reverse.
    format: ReplyFormat,
    logprobs: Option<u8>,
    tools: Option<Arc<ToolSpec>>,
    n: u32,
}

impl ReplyKey {
    pub fn new(request: &GenerationRequest, model: &str, scope: Option<&str>) -> Self {
        let GenerationRequest {
            messages,
            sampling,
            max_tokens,
            max_tokens_cap,
            stop,
            ignore_eos,
            format,
            logprobs,
            tools,
            n,
            span: _,
            first_token_by: _,
        } = request;
        let SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            presence_penalty,
            frequency_penalty,
            logit_bias,
        } = sampling;
        Self {
            scope: scope.map(str::to_owned),
            model: model.to_owned(),
            messages: messages
                .iter()
                .map(|ChatMessage { role, content }| (*role, content.clone()))
                .collect(),
            temperature: temperature.to_bits(),
            top_p: top_p.to_bits(),
            top_k: *top_k,
            seed: *seed,
            presence_penalty: presence_penalty.to_bits(),
            frequency_penalty: frequency_penalty.to_bits(),
            max_tokens: *max_tokens,
            max_tokens_cap: *max_tokens_cap,
            stop: stop.clone(),
            ignore_eos: *ignore_eos,
            logit_bias: logit_bias
                .iter()
                .map(|&(token, bias)| (token, bias.to_bits()))
                .collect(),
            format: format.clone(),
            logprobs: *logprobs,
            tools: tools.clone(),
            n: *n,
        }
    }

    /// The last message, when a user sent it: what a semantic lookup compares by meaning.
    pub fn last_user(&self) -> Option<&str> {
        match self.messages.last() {
            Some((Role::User, text)) => Some(text),
            _ => None,
        }
    }

    /// This key with the last user message left blank: everything a semantic hit must
    /// match exactly (scope, tier, sampling, the earlier conversation).
    pub fn context(&self) -> Option<ReplyKey> {
        self.last_user()?;
        Some(self.with_last_user(""))
    }

    /// This key with `text` as the last user message.
    pub fn with_last_user(&self, text: &str) -> ReplyKey {
        let mut key = self.clone();
        if let Some((Role::User, last)) = key.messages.last_mut() {
            text.clone_into(last);
        }
        key
    }

    /// Bytes the key holds (its messages, stop strings, biases and schema).
    pub fn bytes(&self) -> usize {
        self.messages.iter().map(|(_, m)| m.len()).sum::<usize>()
            + self.stop.iter().map(String::len).sum::<usize>()
            + self.logit_bias.len() * 8
            + self.format.schema().map_or(0, str::len)
    }
}

/// Whether sampling makes the same request give the same reply.
pub fn is_reproducible(sampling: &SamplingParams) -> bool {
    sampling.is_greedy() || sampling.seed.is_some()
}

/// A finished reply, kept in the pieces it streamed in so a replay looks the same.
#[derive(Debug)]
pub struct CachedReply {
    pub pieces: Vec<String>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    stored_at: Instant,
    fresh_for: Duration,
    stale_for: Duration,
    bytes: usize,
}

impl CachedReply {
    /// The events that replay this reply through the normal streaming path: a text
    /// event per cached piece, or, for a reader that takes the reply `whole`, one text
    /// event for all of it (a copy per piece was a visible part of a non-streaming hit).
    pub fn events(&self, whole: bool) -> Vec<TokenEvent> {
        let mut events = Vec::with_capacity(if whole { 2 } else { self.pieces.len() + 1 });
        if whole && !self.pieces.is_empty() {
            events.push(TokenEvent::Text(self.pieces.concat()));
        } else {
            events.extend(self.pieces.iter().cloned().map(TokenEvent::Text));
        }
        events.push(TokenEvent::Finished {
            finish_reason: self.finish_reason,
            usage: self.usage,
            timings: StageTimings::default(),
        });
        events
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    /// This reply with `usage` reporting `prompt_tokens`: replayed for a differently worded
    /// question (a semantic hit), it must count that question's prompt, not its own.
    pub fn for_prompt(&self, prompt_tokens: u32) -> CachedReply {
        CachedReply {
            pieces: self.pieces.clone(),
            usage: Usage {
                prompt_tokens,
                cached_prompt_tokens: None,
                ..self.usage
            },
            ..*self
        }
    }
}

#[derive(Debug)]
pub enum Lookup {
    Fresh(Arc<CachedReply>),
    /// Past its TTL but within `max_stale`: served only when no tier can answer in time.
    Stale(Arc<CachedReply>),
    Miss,
}

/// How long a stored reply stays usable (from the route that produced it).
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    pub ttl: Duration,
    pub max_stale: Duration,
}

pub struct CacheCounters {
    pub evictions: Counter,
}

pub struct ReplyCache {
    /// Finished replies, least recently used first out, with their bytes counted once
    /// (the key's text and the reply's). One lock: a lookup reorders the list.
    stored: Mutex<Stored>,
    max_entries: usize,
    max_bytes: usize,
    /// Generations running now, by key; the pump task removes its own entry when it ends.
    in_flight: DashMap<ReplyKey, Arc<SharedGeneration>>,
    counters: CacheCounters,
    /// Stored replies of `cache = "semantic"` routes, by the meaning of their last user
    /// message.
    pub semantic: SemanticIndex,
}

struct Stored {
    replies: LruCache<ReplyKey, Arc<CachedReply>>,
    bytes: usize,
}

impl Stored {
    fn remove(&mut self, key: &ReplyKey) {
        if let Some(reply) = self.replies.pop(key) {
            self.bytes -= reply.bytes;
        }
    }
}

impl ReplyCache {
    pub fn new(max_entries: usize, max_bytes: usize, counters: CacheCounters) -> Self {
        Self {
            stored: Mutex::new(Stored {
                replies: LruCache::unbounded(),
                bytes: 0,
            }),
            max_entries,
            max_bytes,
            in_flight: DashMap::new(),
            counters,
            semantic: SemanticIndex::new(0, 0),
        }
    }

    /// Gives the semantic index room for `max_entries` entries and `max_bytes` bytes
    /// (without it, nothing is indexed by meaning).
    pub fn with_semantic(mut self, max_entries: usize, max_bytes: usize) -> Self {
        self.semantic = SemanticIndex::new(max_entries, max_bytes);
        self
    }

    fn stored(&self) -> MutexGuard<'_, Stored> {
        // Plain data, updated in whole steps: a panic elsewhere cannot leave it half-written.
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.stored().replies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of key and reply text held: at most `max_bytes`.
    pub fn bytes(&self) -> u64 {
        self.stored().bytes as u64
    }

    pub fn lookup(&self, key: &ReplyKey) -> Lookup {
        self.lookup_at(key, Instant::now())
    }

    /// A hit or stale hit makes the entry the most recently used; an expired one is dropped.
    pub fn lookup_at(&self, key: &ReplyKey, now: Instant) -> Lookup {
        let mut stored = self.stored();
        let Some(reply) = stored.replies.get(key).cloned() else {
            return Lookup::Miss;
        };
        let age = reply.age(now);
        if age <= reply.fresh_for {
            Lookup::Fresh(reply)
        } else if age <= reply.fresh_for + reply.stale_for {
            Lookup::Stale(reply)
        } else {
            stored.remove(key);
            Lookup::Miss
        }
    }

    /// Stores a finished reply, evicting the least recently used entries beyond the
    /// bounds. A reply larger than the whole byte budget is not stored.
    pub fn store(
        &self,
        key: ReplyKey,
        pieces: Vec<String>,
        finish_reason: FinishReason,
        usage: Usage,
        freshness: Freshness,
    ) {
        let bytes = key.bytes() + pieces.iter().map(String::len).sum::<usize>();
        if bytes > self.max_bytes {
            return;
        }
        let reply = Arc::new(CachedReply {
            pieces,
            finish_reason,
            usage,
            stored_at: Instant::now(),
            fresh_for: freshness.ttl,
            stale_for: freshness.max_stale,
            bytes,
        });
        let mut stored = self.stored();
        stored.remove(&key);
        stored.replies.put(key, reply);
        stored.bytes += bytes;
        while stored.replies.len() > self.max_entries || stored.bytes > self.max_bytes {
            let Some((_, evicted)) = stored.replies.pop_lru() else {
                break;
            };
            stored.bytes -= evicted.bytes;
            self.counters.evictions.inc();
        }
    }

    /// Follows the generation of `key` if one is running, else starts it with `submit` and
    /// leads it; one atomic step, so identical concurrent requests start one generation.
    /// Returns the follower and whether this call started the generation.
    ///
    /// `submit` runs while `key`'s map shard is locked (it templates and tokenizes: well
    /// under a millisecond for a typical prompt), so a joiner never sees a gap between
    /// "nobody is generating this" and "somebody is".
    pub fn join_or_lead(
        self: &Arc<Self>,
        key: ReplyKey,
        freshness: Freshness,
        meaning: Option<Embedding>,
        submit: impl FnOnce() -> Result<TokenStream, EngineError>,
    ) -> Result<(Follower, bool), EngineError> {
        let (shared, follower, tokens) = match self.in_flight.entry(key.clone()) {
            Entry::Occupied(running) => {
                if let Some(follower) = running.get().follow() {
                    return Ok((follower, false));
                }
                // Abandoned: its pump is cancelling it; a new generation replaces it.
                let started = start_generation(submit)?;
                running.replace_entry(started.0.clone());
                started
            }
            Entry::Vacant(vacant) => {
                let started = start_generation(submit)?;
                vacant.insert(started.0.clone());
                started
            }
        };
        self.pump(key, shared, tokens, freshness, meaning);
        Ok((follower, true))
    }

    /// Runs `tokens` as the shared generation `shared` of `key`: a task pumps its events
    /// into the log its followers read. On a successful finish the reply is stored with
    /// `freshness`, and indexed by `meaning` (the embedding of its last user message) when
    /// given.
    fn pump(
        self: &Arc<Self>,
        key: ReplyKey,
        shared: Arc<SharedGeneration>,
        tokens: TokenStream,
        freshness: Freshness,
        meaning: Option<Embedding>,
    ) {
        let cache = self.clone();
        tokio::spawn(async move {
            let outcome = shared.pump(tokens).await;
            cache
                .in_flight
                .remove_if(&key, |_, running| Arc::ptr_eq(running, &shared));
            if let Some((pieces, finish_reason, usage)) = outcome {
                // Stored before indexed: a lookup that finds the entry finds its reply.
                let indexed = meaning.and_then(|vector| Some((key.context()?, vector)));
                let text = key.last_user().unwrap_or_default().to_owned();
                cache.store(key, pieces, finish_reason, usage, freshness);
                if let Some((context, vector)) = indexed {
                    cache
                        .semantic
                        .insert(context, &text, &vector, freshness.ttl);
                }
            }
        });
    }
}

/// Submits a generation and makes its leader's follower before the entry is published: a
/// joiner that comes and goes at once must not leave it without followers (abandoned).
fn start_generation(
    submit: impl FnOnce() -> Result<TokenStream, EngineError>,
) -> Result<(Arc<SharedGeneration>, Follower, TokenStream), EngineError> {
    let tokens = submit()?;
    let mut shared = SharedGeneration::new(tokens.prompt_tokens);
    shared.answered_by = tokens.endpoint_slot();
    let shared = Arc::new(shared);
    let follower = shared
        .follow()
        .unwrap_or_else(|| Follower::detached(tokens.prompt_tokens));
    Ok((shared, follower, tokens))
}

/// The event log of one generation that several responses read.
pub struct SharedGeneration {
    log: Mutex<EventLog>,
    /// Woken on every new event (followers wait on it).
    appended: Notify,
    /// Woken when the last follower leaves (the pump waits on it).
    abandoned: Notify,
    /// The remote endpoint generating it, once known (`None` for a local model).
    answered_by: Option<Arc<OnceLock<String>>>,
}

struct EventLog {
    prompt_tokens: u32,
    events: Vec<TokenEvent>,
    done: bool,
    followers: usize,
    /// Once nobody follows, nobody may join: the pump is cancelling the sequence.
    abandoned: bool,
}

impl SharedGeneration {
    fn new(prompt_tokens: u32) -> Self {
        Self {
            log: Mutex::new(EventLog {
                prompt_tokens,
                events: Vec::new(),
                done: false,
                followers: 0,
                abandoned: false,
            }),
            appended: Notify::new(),
            abandoned: Notify::new(),
            answered_by: None,
        }
    }

    fn log(&self) -> MutexGuard<'_, EventLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn follow(self: &Arc<Self>) -> Option<Follower> {
        let mut log = self.log();
        if log.abandoned {
            return None;
        }
        log.followers += 1;
        Some(Follower {
            prompt_tokens: log.prompt_tokens,
            shared: Some(self.clone()),
            next: 0,
        })
    }

    /// Moves engine events into the log until the last one, or until every follower has
    /// gone (returning drops `tokens`, which cancels the sequence). A successful reply
    /// comes back for the cache.
    async fn pump(&self, mut tokens: TokenStream) -> Option<(Vec<String>, FinishReason, Usage)> {
        loop {
            let abandoned = self.abandoned.notified();
            let event = tokio::select! {
                event = tokens.next_event() => event.unwrap_or_else(ended_without_finish),
                () = abandoned => {
                    if self.log().abandoned {
                        return None;
                    }
                    continue;
                }
            };
            let mut log = self.log();
            let finished = match &event {
                TokenEvent::Text(_) | TokenEvent::Scored { .. } | TokenEvent::ToolCalls(_) => None,
                TokenEvent::Finished {
                    finish_reason,
                    usage,
                    ..
                } => Some(Some((*finish_reason, *usage))),
                TokenEvent::Failed(_) => Some(None),
            };
            log.events.push(event);
            if finished.is_some() {
                log.done = true;
            }
            let reply = finished.map(|outcome| {
                outcome.map(|(finish_reason, usage)| {
                    let pieces = log
                        .events
                        .iter()
                        .filter_map(|e| match e {
                            TokenEvent::Text(text) | TokenEvent::Scored { text, .. } => {
                                Some(text.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    (pieces, finish_reason, usage)
                })
            });
            drop(log);
            self.appended.notify_waiters();
            if let Some(reply) = reply {
                return reply;
            }
        }
    }
}

fn ended_without_finish() -> TokenEvent {
    TokenEvent::Failed(crate::engine::EngineError::Decode(
        "the model thread ended the sequence without finishing it".into(),
    ))
}

/// One response's read position in a shared generation.
pub struct Follower {
    pub prompt_tokens: u32,
    shared: Option<Arc<SharedGeneration>>,
    next: usize,
}

impl Follower {
    /// The remote endpoint generating the shared reply, once it has sent text.
    pub fn endpoint(&self) -> Option<String> {
        let slot = self.shared.as_ref()?.answered_by.as_ref()?;
        slot.get().cloned()
    }

    /// A follower of nothing (only if a fresh generation was abandoned before its leader
    /// could follow it, which cannot happen; kept total instead of panicking).
    fn detached(prompt_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            shared: None,
            next: 0,
        }
    }

    pub async fn next_event(&mut self) -> Option<TokenEvent> {
        let shared = self.shared.as_ref()?;
        loop {
            // Registered before looking, so an event appended in between still wakes us.
            let appended = shared.appended.notified();
            {
                let log = shared.log();
                if let Some(event) = log.events.get(self.next) {
                    self.next += 1;
                    return Some(event.clone());
                }
                if log.done {
                    return None;
                }
            }
            appended.await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let Some(shared) = &self.shared else { return };
        let mut log = shared.log();
        log.followers -= 1;
        if log.followers == 0 && !log.done {
            log.abandoned = true;
            drop(log);
            // notify_one keeps a permit if the pump is not waiting at this moment.
            shared.abandoned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> GenerationRequest {
        GenerationRequest {
            messages: vec![ChatMessage {
                role: Role::User,
                content: text.into(),
            }],
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens: Some(8),
            max_tokens_cap: None,
            stop: Vec::new(),
            ignore_eos: false,
            span: tracing::Span::none(),
            first_token_by: None,
            ..GenerationRequest::default()
        }
    }

    fn cache(max_entries: usize, max_bytes: usize) -> ReplyCache {
        ReplyCache::new(
            max_entries,
            max_bytes,
            CacheCounters {
                evictions: Counter::default(),
            },
        )
    }

    const FOREVER: Freshness = Freshness {
        ttl: Duration::from_secs(3600),
        max_stale: Duration::ZERO,
    };

    fn store(cache: &ReplyCache, key: &ReplyKey, reply: &str, freshness: Freshness) {
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_prompt_tokens: Some(0),
        };
        cache.store(
            key.clone(),
            vec![reply.into()],
            FinishReason::Stop,
            usage,
            freshness,
        );
    }

    #[test]
    fn every_output_shaping_field_changes_the_key() {
        let base = request("hi");
        let key = |r: &GenerationRequest| ReplyKey::new(r, "fast", Some("k"));
        let mut variants = Vec::new();
        let mut r = base.clone();
        r.sampling.temperature = 0.5;
        variants.push(r);
        let mut r = base.clone();
        r.sampling.seed = Some(1);
        variants.push(r);
        let mut r = base.clone();
        r.max_tokens = Some(9);
        variants.push(r);
        let mut r = base.clone();
        r.stop = vec!["x".into()];
        variants.push(r);
        let mut r = base.clone();
        r.messages[0].role = Role::System;
        variants.push(r);
        for variant in &variants {
            assert_ne!(key(&base), key(variant), "{variant:?}");
        }
        assert_ne!(key(&base), ReplyKey::new(&base, "full", Some("k")));
        assert_ne!(key(&base), ReplyKey::new(&base, "fast", Some("other")));
        assert_eq!(key(&base), key(&base.clone()));
    }

    #[test]
    fn a_replay_is_a_piece_at_a_time_or_whole() {
        let cache = cache(10, 1 << 20);
        let key = ReplyKey::new(&request("hi"), "fast", None);
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 3,
            cached_prompt_tokens: None,
        };
        let pieces = ["The", " capital", " is Paris."].map(String::from).to_vec();
        cache.store(key.clone(), pieces, FinishReason::Stop, usage, FOREVER);
        let Lookup::Fresh(reply) = cache.lookup(&key) else {
            panic!("stored, so found");
        };
        let finished = TokenEvent::Finished {
            finish_reason: FinishReason::Stop,
            usage,
            timings: StageTimings::default(),
        };
        let text = |t: &str| TokenEvent::Text(t.into());
        assert_eq!(
            reply.events(false),
            vec![
                text("The"),
                text(" capital"),
                text(" is Paris."),
                finished.clone()
            ]
        );
        assert_eq!(
            reply.events(true),
            vec![text("The capital is Paris."), finished.clone()]
        );
        // An empty reply is its ending alone, whole or not.
        cache.store(key.clone(), Vec::new(), FinishReason::Stop, usage, FOREVER);
        let Lookup::Fresh(empty) = cache.lookup(&key) else {
            panic!("stored, so found");
        };
        assert_eq!(empty.events(true), vec![finished.clone()]);
        assert_eq!(empty.events(false), vec![finished]);
    }

    #[test]
    fn replies_expire_to_stale_then_out() {
        let cache = cache(10, 1 << 20);
        let key = ReplyKey::new(&request("hi"), "fast", None);
        let freshness = Freshness {
            ttl: Duration::from_secs(10),
            max_stale: Duration::from_secs(5),
        };
        store(&cache, &key, "hello", freshness);
        let now = Instant::now();
        assert!(matches!(cache.lookup_at(&key, now), Lookup::Fresh(_)));
        assert!(matches!(
            cache.lookup_at(&key, now + Duration::from_secs(12)),
            Lookup::Stale(_)
        ));
        assert!(matches!(
            cache.lookup_at(&key, now + Duration::from_secs(16)),
            Lookup::Miss
        ));
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn oldest_entries_are_evicted_beyond_the_entry_bound() {
        let cache = cache(2, 1 << 20);
        let keys: Vec<ReplyKey> = (0..3)
            .map(|i| ReplyKey::new(&request(&format!("q{i}")), "fast", None))
            .collect();
        for key in &keys {
            store(&cache, key, "reply", FOREVER);
        }
        assert_eq!(cache.len(), 2);
        assert!(matches!(cache.lookup(&keys[0]), Lookup::Miss));
        assert!(matches!(cache.lookup(&keys[2]), Lookup::Fresh(_)));
        assert_eq!(cache.counters.evictions.get(), 1);
    }

    #[test]
    fn a_reply_looked_up_recently_outlives_one_stored_later_but_unused() {
        let cache = cache(2, 1 << 20);
        let keys: Vec<ReplyKey> = (0..3)
            .map(|i| ReplyKey::new(&request(&format!("q{i}")), "fast", None))
            .collect();
        store(&cache, &keys[0], "reply", FOREVER);
        store(&cache, &keys[1], "reply", FOREVER);
        // q0 is the oldest but was just used: q1 goes instead.
        assert!(matches!(cache.lookup(&keys[0]), Lookup::Fresh(_)));
        store(&cache, &keys[2], "reply", FOREVER);
        assert!(matches!(cache.lookup(&keys[0]), Lookup::Fresh(_)));
        assert!(matches!(cache.lookup(&keys[1]), Lookup::Miss));
    }

    #[test]
    fn bytes_count_each_key_once_and_drop_to_zero_when_emptied() {
        let cache = cache(100, 1 << 20);
        let key = ReplyKey::new(&request("abcd"), "fast", None);
        store(&cache, &key, "xyz", FOREVER);
        // The key's text (4) and the reply's (3), nothing twice.
        assert_eq!(cache.bytes(), 7);
        for i in 0..1000 {
            let key = ReplyKey::new(&request(&format!("{i:04}")), "fast", None);
            store(&cache, &key, "xyz", FOREVER);
        }
        assert_eq!(cache.len(), 100);
        assert_eq!(cache.bytes(), 700);
    }

    #[test]
    fn byte_bound_holds_and_oversized_replies_are_not_stored() {
        let cache = cache(100, 64);
        let small = ReplyKey::new(&request("a"), "fast", None);
        let other = ReplyKey::new(&request("b"), "fast", None);
        store(&cache, &small, &"x".repeat(40), FOREVER);
        store(&cache, &other, &"y".repeat(40), FOREVER);
        assert!(cache.bytes() <= 64, "{}", cache.bytes());
        assert!(matches!(cache.lookup(&small), Lookup::Miss));
        let huge = ReplyKey::new(&request("c"), "fast", None);
        store(&cache, &huge, &"z".repeat(100), FOREVER);
        assert!(matches!(cache.lookup(&huge), Lookup::Miss));
    }

    #[test]
    fn replacing_an_entry_keeps_the_byte_count_exact() {
        let cache = cache(10, 1 << 20);
        let key = ReplyKey::new(&request("a"), "fast", None);
        store(&cache, &key, "one", FOREVER);
        let first = cache.bytes();
        store(&cache, &key, "three", FOREVER);
        assert_eq!(cache.bytes(), first + 2);
        assert_eq!(cache.len(), 1);
    }

    fn engine_stream() -> (tokio::sync::mpsc::UnboundedSender<TokenEvent>, TokenStream) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, TokenStream::new(3, rx))
    }

    async fn drain(follower: &mut Follower) -> Vec<TokenEvent> {
        let mut events = Vec::new();
        while let Some(event) = follower.next_event().await {
            events.push(event);
        }
        events
    }

    #[tokio::test]
    async fn followers_replay_from_the_start_and_the_reply_is_stored() {
        let cache = Arc::new(cache(10, 1 << 20));
        let key = ReplyKey::new(&request("a"), "fast", None);
        let (tx, tokens) = engine_stream();
        let (mut leader, led) = cache
            .join_or_lead(key.clone(), FOREVER, None, || Ok(tokens))
            .expect("started");
        assert!(led);
        tx.send(TokenEvent::Text("Hel".into())).expect("open");
        assert_eq!(
            leader.next_event().await,
            Some(TokenEvent::Text("Hel".into()))
        );
        let (mut late, led) = cache
            .join_or_lead(key.clone(), FOREVER, None, || {
                panic!("must join, not submit")
            })
            .expect("joined");
        assert!(!led, "the generation is running");
        let finished = TokenEvent::Finished {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_prompt_tokens: Some(0),
            },
            timings: StageTimings::default(),
        };
        tx.send(TokenEvent::Text("lo".into())).expect("open");
        tx.send(finished.clone()).expect("open");
        let hel = TokenEvent::Text("Hel".into());
        let lo = TokenEvent::Text("lo".into());
        assert_eq!(drain(&mut leader).await, [lo.clone(), finished.clone()]);
        assert_eq!(drain(&mut late).await, [hel, lo, finished]);
        // The pump stores the reply after the last event.
        for _ in 0..100 {
            if let Lookup::Fresh(reply) = cache.lookup(&key) {
                assert_eq!(reply.pieces, ["Hel", "lo"]);
                assert!(!cache.in_flight.contains_key(&key));
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the finished reply was not stored");
    }

    #[tokio::test]
    async fn last_follower_leaving_cancels_the_engine_stream() {
        let cache = Arc::new(cache(10, 1 << 20));
        let key = ReplyKey::new(&request("a"), "fast", None);
        let (tx, tokens) = engine_stream();
        let (leader, _) = cache
            .join_or_lead(key.clone(), FOREVER, None, || Ok(tokens))
            .expect("started");
        let (second, led) = cache
            .join_or_lead(key.clone(), FOREVER, None, || {
                panic!("must join, not submit")
            })
            .expect("joined");
        assert!(!led);
        drop(leader);
        assert!(!tx.is_closed(), "one follower remains");
        drop(second);
        // The pump drops the engine stream, which is what frees the sequence.
        tokio::time::timeout(Duration::from_secs(5), tx.closed())
            .await
            .expect("the engine stream must be dropped");
        assert!(matches!(cache.lookup(&key), Lookup::Miss));
    }
}
