//! Embedding and semantic-index costs, printed as numbers (no pass/fail):
//!
//! - one 64-token text embedded alone, and 16 concurrent callers (batched): p50 and p99;
//! - a semantic-index lookup (brute-force dot products in one context, the worst case)
//!   at 10,000 and 100,000 entries: p50 and p99.
//!
//! `cargo bench --bench embedding` or `just bench-embedding` (needs `just models`). Run
//! on an otherwise idle machine.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tiergate::cache::ReplyKey;
use tiergate::chat::{ChatMessage, Role, SamplingParams};
use tiergate::engine::GenerationRequest;
use tiergate::semantic::{SemanticIndex, SemanticLookup};

const DIMS: usize = 384;

fn unit(rng: &mut impl Rng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIMS).map(|_| rng.random::<f32>() - 0.5).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn context() -> ReplyKey {
    let request = GenerationRequest {
        messages: vec![ChatMessage {
            role: Role::User,
            content: String::new(),
        }],
        sampling: SamplingParams::default(),
        max_tokens: Some(64),
        max_tokens_cap: None,
        stop: Vec::new(),
        ignore_eos: false,
        span: tracing::Span::none(),
        first_token_by: None,
        ..GenerationRequest::default()
    };
    ReplyKey::new(&request, "fast", None)
}

/// Lookup time with every entry in one context (the worst case), and recall: queries
/// planted near a stored entry (similarity about 0.91, over the 0.875 default) must find
/// it, which measures the sign-bit shortlist of large buckets.
fn lookups(entries: usize) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let index = SemanticIndex::new(entries, usize::MAX);
    let context = context();
    let mut stored = Vec::with_capacity(entries);
    for i in 0..entries {
        let vector = unit(&mut rng);
        index.insert(
            context.clone(),
            &format!("question number {i}"),
            &vector,
            Duration::from_secs(3600),
        );
        stored.push(vector);
    }
    let mut times = Vec::new();
    let mut found = 0;
    let queries = 200;
    for _ in 0..queries {
        let target = rng.random_range(0..entries);
        let noise = unit(&mut rng);
        let near: Vec<f32> = stored[target]
            .iter()
            .zip(&noise)
            .map(|(v, n)| v + 0.45 * n)
            .collect();
        let norm = near.iter().map(|x| x * x).sum::<f32>().sqrt();
        let query: Vec<f32> = near.iter().map(|x| x / norm).collect();
        let text = format!("question number {target}");
        let started = Instant::now();
        let outcome = index.lookup(&context, &text, &query, 0.875);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if let SemanticLookup::Hit { cached_text, .. } = outcome {
            found += usize::from(*cached_text == *text);
        }
    }
    times.sort_by(f64::total_cmp);
    format!(
        "semantic lookup, {entries:>6} entries in one context: p50 {:.3} ms, p99 {:.3} ms; planted neighbours found {found}/{queries}",
        times[times.len() / 2],
        times[times.len() * 99 / 100]
    )
}

fn main() {
    // `cargo bench` passes flags such as --bench; this harness takes none.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiergate.toml");
    match tiergate::evaluate::embedding_latency(&config, 200) {
        Ok(report) => print!("{report}"),
        Err(err) => eprintln!("embedding latency: {err:#}"),
    }
    for entries in [1_000, 10_000, 100_000] {
        println!("{}", lookups(entries));
    }
}
