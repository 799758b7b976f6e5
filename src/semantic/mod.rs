//! The semantic side of the reply cache: finished replies indexed by the embedding of
//! their last user message, found again by a question that means the same.
//!
//! ```text
//! exact lookup (cache.rs) ─ miss ─► SemanticIndex::lookup(context, text, vector)
//!                                     │ entries of the same context (scope, tier, sampling,
//!                                     │ earlier conversation: compared exactly)
//!                                     ▼
//!                   best similarity >= threshold ─► guards (numbers, negation, opposites,
//!                                                   names) ─► the cached reply's exact key
//! ```
//!
//! Entries live in buckets keyed by their context, so a lookup scans only replies that
//! could answer it. Within a bucket the scan is a brute-force dot product over contiguous
//! unit vectors stored as 8-bit integers (a quarter of the memory to read per lookup, and
//! four times the entries per byte; similarities are off by a few thousandths at most).
//! `benches/embedding.rs` measures it at 10k and 100k entries. The index is
//! bounded by entries and bytes, evicts the least recently used, and drops entries past
//! their time to live; an entry whose reply left the exact cache is dropped when found.

pub mod guards;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use crate::cache::ReplyKey;
pub use guards::{Refusal, Signature};

/// What a semantic lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum SemanticLookup {
    /// A cached question close enough that passed every guard: its reply answers this one.
    Hit {
        key: ReplyKey,
        cached_text: Arc<str>,
        similarity: f32,
    },
    /// The closest question over the threshold was refused by a guard (and no other
    /// candidate passed).
    Refused {
        cached_text: Arc<str>,
        similarity: f32,
        refusal: Refusal,
    },
    /// Nothing over the threshold; `best` is the closest similarity seen, if any.
    Miss { best: Option<f32> },
}

pub struct SemanticIndex {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

struct Inner {
    buckets: HashMap<Arc<ReplyKey>, Bucket>,
    /// Entry ids, least recently used first, each with its bucket.
    order: LruCache<u64, Arc<ReplyKey>>,
    next_id: u64,
    bytes: usize,
}

/// The entries of one context, in parallel arrays; `vectors` holds `dims` quantised
/// components each (see [`quantise`]).
struct Bucket {
    dims: usize,
    ids: Vec<u64>,
    texts: Vec<Arc<str>>,
    signatures: Vec<Signature>,
    expires: Vec<Instant>,
    vectors: Vec<i8>,
    scales: Vec<f32>,
    /// [`sign_code`] of each entry, `dims / 64` words (rounded up) each.
    codes: Vec<u64>,
}

/// Removes row `at` of `rows` (rows of `width` values) by moving the last row into its
/// place, as `Vec::swap_remove` does for single values.
fn swap_remove_row<T: Copy>(rows: &mut Vec<T>, at: usize, width: usize) {
    let last = rows.len() / width - 1;
    if at != last {
        rows.copy_within(last * width..(last + 1) * width, at * width);
    }
    rows.truncate(last * width);
}

/// Buckets up to this size are scanned exactly (about 0.05 ms per thousand entries).
const EXACT_SCAN_LIMIT: usize = 4096;
/// Entries a larger bucket's sign-bit pass keeps for exact scoring.
const SHORTLIST: usize = 256;

/// One bit per dimension: whether the component is positive. The Hamming distance of two
/// codes estimates the angle between the vectors (random-hyperplane hashing).
fn sign_code(vector: &[f32]) -> Vec<u64> {
    vector
        .chunks(64)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .fold(0u64, |code, (bit, v)| code | (u64::from(*v > 0.0) << bit))
        })
        .collect()
}

/// A vector as 8-bit integers and the scale that maps them back: its largest component
/// becomes ±127, so the many small components of a 384-dimensional unit vector keep
/// their precision (a dot product is off by about a thousandth).
fn quantise(vector: &[f32]) -> (Vec<i8>, f32) {
    let largest = vector.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = if largest > 0.0 { 127.0 / largest } else { 1.0 };
    let values = vector
        .iter()
        .map(|v| (v * scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (values, scale)
}

/// The integer dot product of two quantised vectors. Sixteen independent sums let the
/// compiler use SIMD multiply-adds.
fn quantised_dot(a: &[i8], b: &[i8]) -> i32 {
    let mut lanes = [0i32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: i32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..16 {
            lanes[lane] += i32::from(x[lane]) * i32::from(y[lane]);
        }
    }
    lanes.iter().sum::<i32>() + tail
}

impl Bucket {
    fn new(dims: usize) -> Self {
        Self {
            dims,
            ids: Vec::new(),
            texts: Vec::new(),
            signatures: Vec::new(),
            expires: Vec::new(),
            vectors: Vec::new(),
            scales: Vec::new(),
            codes: Vec::new(),
        }
    }

    /// The `keep` entries whose sign codes are nearest to `code`, by Hamming distance.
    fn nearest_by_sign(&self, code: &[u64], keep: usize) -> Vec<usize> {
        let words = code.len();
        let mut distances: Vec<(u32, usize)> = self
            .codes
            .chunks_exact(words)
            .enumerate()
            .map(|(at, entry)| {
                let distance = entry
                    .iter()
                    .zip(code)
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum();
                (distance, at)
            })
            .collect();
        if distances.len() > keep {
            distances.select_nth_unstable(keep - 1);
            distances.truncate(keep);
        }
        distances.into_iter().map(|(_, at)| at).collect()
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// Removes entry `at` by moving the last one into its place; returns its text.
    fn swap_remove(&mut self, at: usize) -> Arc<str> {
        swap_remove_row(&mut self.vectors, at, self.dims);
        swap_remove_row(&mut self.codes, at, self.dims.div_ceil(64));
        self.scales.swap_remove(at);
        self.signatures.swap_remove(at);
        self.expires.swap_remove(at);
        self.ids.swap_remove(at);
        self.texts.swap_remove(at)
    }
}

/// Bytes an entry is charged: its text (counted twice: the signature holds its words),
/// its vector, and bookkeeping.
fn entry_bytes(text: &str, dims: usize) -> usize {
    2 * text.len() + dims + dims.div_ceil(8) + 164
}

impl SemanticIndex {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                buckets: HashMap::new(),
                order: LruCache::unbounded(),
                next_id: 0,
                bytes: 0,
            }),
            max_entries,
            max_bytes,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Updated in whole steps under the lock: a panic elsewhere leaves it consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.inner().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.inner().bytes
    }

    /// Indexes the reply of `context` + `text` under `vector` for `ttl`, replacing an
    /// entry with the same text, and evicts the least recently used beyond the bounds.
    pub fn insert(&self, context: ReplyKey, text: &str, vector: &[f32], ttl: Duration) {
        let dims = vector.len();
        let bytes = entry_bytes(text, dims);
        if bytes > self.max_bytes || self.max_entries == 0 || dims == 0 {
            return;
        }
        let mut inner = self.inner();
        inner.remove_text(&context, text);
        let context = match inner.buckets.get_key_value(&context) {
            Some((shared, _)) => shared.clone(),
            None => {
                // A bucket's key holds the earlier conversation: it is charged once.
                inner.bytes += context.bytes();
                let shared = Arc::new(context);
                inner.buckets.insert(shared.clone(), Bucket::new(dims));
                shared
            }
        };
        let id = inner.next_id;
        inner.next_id += 1;
        // Every vector of one model has the same length; another could not share rows.
        let Some(bucket) = inner.buckets.get_mut(&context).filter(|b| b.dims == dims) else {
            return;
        };
        bucket.ids.push(id);
        bucket.texts.push(text.into());
        bucket.signatures.push(Signature::of(text));
        bucket.expires.push(Instant::now() + ttl);
        let (values, scale) = quantise(vector);
        bucket.vectors.extend(values);
        bucket.scales.push(scale);
        bucket.codes.extend(sign_code(vector));
        inner.order.put(id, context);
        inner.bytes += bytes;
        while inner.order.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some((id, context)) = inner.order.peek_lru().map(|(i, c)| (*i, c.clone())) else {
                break;
            };
            inner.remove(&context, id);
        }
    }

    /// The best cached question of `context` that means the same as `text` (similarity
    /// of at least `threshold`) and passes the guards.
    pub fn lookup(
        &self,
        context: &ReplyKey,
        text: &str,
        vector: &[f32],
        threshold: f32,
    ) -> SemanticLookup {
        let dims = vector.len();
        let now = Instant::now();
        // Computed before the lock: other requests wait on it.
        let asked = Signature::of(text);
        let (query, query_scale) = quantise(vector);
        let code = sign_code(vector);
        let mut inner = self.inner();
        let Some((shared_context, bucket)) = inner.buckets.get_key_value(context) else {
            return SemanticLookup::Miss { best: None };
        };
        if dims == 0 || dims != bucket.dims {
            return SemanticLookup::Miss { best: None };
        }
        let shared_context = shared_context.clone();
        let mut best = None::<f32>;
        let mut expired = Vec::new();
        let mut candidates = Vec::new();
        // A large bucket is first narrowed by the sign bits of each vector (Hamming
        // distance approximates the angle), and only the closest few are scored exactly.
        let scan: Vec<usize> = if bucket.ids.len() > EXACT_SCAN_LIMIT {
            bucket.nearest_by_sign(&code, SHORTLIST)
        } else {
            (0..bucket.ids.len()).collect()
        };
        for at in scan {
            let row = &bucket.vectors[at * dims..(at + 1) * dims];
            if bucket.expires[at] <= now {
                expired.push(bucket.ids[at]);
                continue;
            }
            let score = quantised_dot(row, &query) as f32 / (bucket.scales[at] * query_scale);
            best = Some(best.map_or(score, |b| b.max(score)));
            if score >= threshold {
                candidates.push((score, at));
            }
        }
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut outcome = SemanticLookup::Miss { best };
        let mut hit_id = None;
        for (score, at) in candidates {
            match bucket.signatures[at].refuses(&asked) {
                None => {
                    hit_id = Some(bucket.ids[at]);
                    outcome = SemanticLookup::Hit {
                        key: context.with_last_user(&bucket.texts[at]),
                        cached_text: bucket.texts[at].clone(),
                        similarity: score,
                    };
                    break;
                }
                Some(refusal) if matches!(outcome, SemanticLookup::Miss { .. }) => {
                    outcome = SemanticLookup::Refused {
                        cached_text: bucket.texts[at].clone(),
                        similarity: score,
                        refusal,
                    };
                }
                Some(_) => {}
            }
        }
        if let Some(id) = hit_id {
            inner.order.promote(&id);
        }
        for id in expired {
            inner.remove(&shared_context, id);
        }
        outcome
    }

    /// Drops the entry for `context` + `text` (its reply left the exact cache).
    pub fn forget(&self, context: &ReplyKey, text: &str) {
        self.inner().remove_text(context, text);
    }
}

impl Inner {
    /// Removes the entry of `context` whose question is `text`, if there is one.
    fn remove_text(&mut self, context: &ReplyKey, text: &str) {
        let Some((context, bucket)) = self.buckets.get_key_value(context) else {
            return;
        };
        let Some(at) = bucket.texts.iter().position(|t| &**t == text) else {
            return;
        };
        let (context, id) = (context.clone(), bucket.ids[at]);
        self.remove(&context, id);
    }

    fn remove(&mut self, context: &Arc<ReplyKey>, id: u64) {
        self.order.pop(&id);
        let Some(bucket) = self.buckets.get_mut(context) else {
            return;
        };
        let Some(at) = bucket.position(id) else {
            return;
        };
        let text = bucket.swap_remove(at);
        self.bytes -= entry_bytes(&text, bucket.dims);
        if bucket.ids.is_empty() {
            self.buckets.remove(context);
            self.bytes -= context.bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, Role, SamplingParams};
    use crate::engine::GenerationRequest;

    fn context(scope: &str) -> ReplyKey {
        let request = GenerationRequest {
            messages: vec![
                ChatMessage {
                    role: Role::System,
                    content: "be brief".into(),
                },
                ChatMessage {
                    role: Role::User,
                    content: String::new(),
                },
            ],
            sampling: SamplingParams::default(),
            max_tokens: Some(16),
            max_tokens_cap: None,
            stop: Vec::new(),
            ignore_eos: false,
            span: tracing::Span::none(),
            first_token_by: None,
            ..GenerationRequest::default()
        };
        ReplyKey::new(&request, "fast", Some(scope))
    }

    fn unit(values: &[f32]) -> Vec<f32> {
        let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
        values.iter().map(|v| v / norm).collect()
    }

    #[tokio::test]
    async fn a_close_question_hits_and_a_guarded_look_alike_is_refused() {
        let index = SemanticIndex::new(100, 1 << 20);
        let ttl = Duration::from_secs(60);
        index.insert(
            context("a"),
            "How do I turn on dark mode?",
            &unit(&[1.0, 0.0, 0.0]),
            ttl,
        );
        let near = unit(&[1.0, 0.1, 0.0]);
        match index.lookup(&context("a"), "how can I enable dark mode", &near, 0.9) {
            SemanticLookup::Hit {
                key, similarity, ..
            } => {
                assert!(similarity > 0.99);
                assert_eq!(
                    key,
                    context("a").with_last_user("How do I turn on dark mode?")
                );
            }
            other => panic!("expected a hit, got {other:?}"),
        }
        let refused = index.lookup(&context("a"), "How do I turn off dark mode?", &near, 0.9);
        assert!(
            matches!(&refused, SemanticLookup::Refused { refusal, .. } if refusal.guard() == "opposites"),
            "{refused:?}"
        );
        // Another scope never sees the entry; a far vector misses.
        assert_eq!(
            index.lookup(&context("b"), "how can I enable dark mode", &near, 0.9),
            SemanticLookup::Miss { best: None }
        );
        assert!(matches!(
            index.lookup(&context("a"), "x", &unit(&[0.0, 1.0, 0.0]), 0.9),
            SemanticLookup::Miss { best: Some(b) } if b.abs() < 1e-6
        ));
    }

    #[tokio::test]
    async fn bounds_evict_the_least_recently_used_and_bytes_return_to_zero() {
        let dims = 3;
        let index = SemanticIndex::new(2, 1 << 20);
        let ttl = Duration::from_secs(60);
        index.insert(context("a"), "first", &unit(&[1.0, 0.0, 0.0]), ttl);
        index.insert(context("a"), "second", &unit(&[0.0, 1.0, 0.0]), ttl);
        // Touch "first", so "second" is the least recently used when "third" comes.
        let hit = index.lookup(&context("a"), "first", &unit(&[1.0, 0.0, 0.0]), 0.9);
        assert!(matches!(hit, SemanticLookup::Hit { .. }));
        index.insert(context("a"), "third", &unit(&[0.0, 0.0, 1.0]), ttl);
        assert_eq!(index.len(), 2);
        assert!(matches!(
            index.lookup(&context("a"), "second", &unit(&[0.0, 1.0, 0.0]), 0.9),
            SemanticLookup::Miss { .. }
        ));
        assert_eq!(
            index.bytes(),
            context("a").bytes() + entry_bytes("first", dims) + entry_bytes("third", dims)
        );
        index.forget(&context("a"), "first");
        index.forget(&context("a"), "third");
        assert_eq!((index.len(), index.bytes()), (0, 0));

        let small = SemanticIndex::new(100, context("a").bytes() + 2 * entry_bytes("abc", dims));
        for text in ["abc", "def", "ghi"] {
            small.insert(context("a"), text, &unit(&[1.0, 1.0, 0.0]), ttl);
        }
        assert_eq!(small.len(), 2);
        assert!(small.bytes() <= context("a").bytes() + 2 * entry_bytes("abc", dims));
    }

    #[test]
    fn quantised_similarity_is_within_a_few_thousandths() {
        let a = unit(
            &(0..384)
                .map(|i| ((i * 7919) % 97) as f32 - 48.0)
                .collect::<Vec<_>>(),
        );
        let b = unit(
            &(0..384)
                .map(|i| ((i * 104729) % 89) as f32 - 44.0)
                .collect::<Vec<_>>(),
        );
        for (x, y) in [(&a, &b), (&a, &a), (&b, &b)] {
            let exact = crate::embed::similarity(x, y);
            let ((qx, sx), (qy, sy)) = (quantise(x), quantise(y));
            let approx = quantised_dot(&qx, &qy) as f32 / (sx * sy);
            assert!((exact - approx).abs() < 0.003, "{exact} vs {approx}");
        }
    }

    #[test]
    fn a_large_bucket_finds_a_near_entry_through_the_sign_bit_shortlist() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut random = || {
            unit(
                &(0..384)
                    .map(|_| rng.random::<f32>() - 0.5)
                    .collect::<Vec<_>>(),
            )
        };
        let index = SemanticIndex::new(10_000, usize::MAX);
        let entries = EXACT_SCAN_LIMIT + 500;
        let mut stored = Vec::new();
        for i in 0..entries {
            let vector = random();
            index.insert(
                context("a"),
                &format!("q {i}"),
                &vector,
                Duration::from_secs(60),
            );
            stored.push(vector);
        }
        for target in [0, 1234, entries - 1] {
            let noise = random();
            let near: Vec<f32> = stored[target]
                .iter()
                .zip(&noise)
                .map(|(v, n)| v + 0.4 * n)
                .collect();
            let text = format!("q {target}");
            match index.lookup(&context("a"), &text, &unit(&near), 0.85) {
                SemanticLookup::Hit { cached_text, .. } => assert_eq!(&*cached_text, text),
                other => panic!("{target}: {other:?}"),
            }
        }
        // Removing entries keeps vectors, scales and codes aligned.
        for i in 0..300 {
            index.forget(&context("a"), &format!("q {i}"));
        }
        assert_eq!(index.len(), entries - 300);
        let near: Vec<f32> = stored[entries - 1].iter().map(|v| v * 1.0).collect();
        let text = format!("q {}", entries - 1);
        assert!(matches!(
            index.lookup(&context("a"), &text, &near, 0.99),
            SemanticLookup::Hit { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_miss_and_are_dropped() {
        let index = SemanticIndex::new(100, 1 << 20);
        index.insert(
            context("a"),
            "q",
            &unit(&[1.0, 0.0]),
            Duration::from_secs(10),
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            index.lookup(&context("a"), "q", &unit(&[1.0, 0.0]), 0.5),
            SemanticLookup::Miss { best: None }
        );
        assert_eq!((index.len(), index.bytes()), (0, 0));
    }
}
