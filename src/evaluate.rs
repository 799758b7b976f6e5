//! Offline measurements of the gateway's meaning-based decisions, on the real embedding
//! model and the real policy, with no server:
//!
//! - `tiergate eval-routing FILE`: agreement of the routed tier with labelled prompts, with
//!   and without the `similar_to` rules, and (`--sweep`) over k and `min_similarity`;
//! - `tiergate eval-semantic FILE`: hit rate on paraphrases and false-hit rate on
//!   look-alikes of the semantic cache, per threshold, with and without the guards.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use serde::Deserialize;

use crate::chat::ChatRequest;
use crate::check::{load_policy, vocab_models, vocab_tiers};
use crate::config::Config;
use crate::embed::{similarity, EmbedMetrics, Embedder, Embedding};
use crate::gateway;
use crate::router::{Caller, Policy};
use crate::semantic::Signature;

/// Loads the configured embedding model and starts its thread.
pub fn load_embedder(config: &Config) -> anyhow::Result<Arc<Embedder>> {
    let embedding = config
        .embedding
        .as_ref()
        .context("the config has no [embedding] model")?;
    Embedder::load(embedding, EmbedMetrics::default())
}

#[derive(Debug, Deserialize)]
struct LabelledPrompts {
    prompt: Vec<LabelledPrompt>,
}

#[derive(Debug, Deserialize)]
struct LabelledPrompt {
    text: String,
    tier: String,
    class: String,
}

pub struct RoutingEval {
    pub config: PathBuf,
    pub policies: Vec<PathBuf>,
    pub prompts: PathBuf,
    pub sweep: bool,
}

/// Routes every labelled prompt and reports agreement; returns the report.
pub fn routing(options: &RoutingEval) -> anyhow::Result<String> {
    let (config, mut policy) = load_policy(&options.config, &options.policies)?;
    let embedder = load_embedder(&config)?;
    if let Some(examples) = policy.examples.as_mut() {
        examples.embed(&embedder)?;
    }
    let labelled: LabelledPrompts = toml::from_str(
        &std::fs::read_to_string(&options.prompts)
            .with_context(|| format!("cannot read {}", options.prompts.display()))?,
    )
    .with_context(|| format!("cannot parse {}", options.prompts.display()))?;
    let tiers = vocab_tiers(&vocab_models(&config)?);
    let texts: Vec<String> = labelled.prompt.iter().map(|p| p.text.clone()).collect();
    let vectors = embedder.embed_all_blocking(&texts)?;

    let route = |policy: &Policy, prompt: &LabelledPrompt, vector: Option<&Embedding>| {
        let request = ChatRequest::user(prompt.text.clone());
        gateway::explain(
            &tiers,
            policy,
            Caller::default(),
            &request,
            vector.map(|v| &v[..]),
        )
    };
    let mut out = String::new();
    let n = labelled.prompt.len();
    let mut agree_rules = 0;
    let mut agree_both = 0;
    let mut class_votes = 0;
    let mut by_class: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut misses = Vec::new();
    for (prompt, vector) in labelled.prompt.iter().zip(&vectors) {
        let rules_only = route(&policy, prompt, None)?;
        let both = route(&policy, prompt, Some(vector))?;
        agree_rules += usize::from(rules_only.explanation.route.tier == prompt.tier);
        let agrees = both.explanation.route.tier == prompt.tier;
        agree_both += usize::from(agrees);
        let entry = by_class.entry(prompt.class.as_str()).or_default();
        entry.0 += usize::from(agrees);
        entry.1 += 1;
        let voted = both
            .explanation
            .features
            .similar
            .as_ref()
            .and_then(|s| s.class.clone());
        class_votes += usize::from(voted.as_deref() == Some(prompt.class.as_str()));
        if !agrees {
            misses.push(format!(
                "  {} (labelled {}/{}; rule `{}`, nearest vote {}): {}",
                both.explanation.route.tier,
                prompt.tier,
                prompt.class,
                both.explanation.route.rule,
                voted.as_deref().unwrap_or("-"),
                prompt.text
            ));
        }
    }
    let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
    let _ = writeln!(
        out,
        "{n} labelled prompts from {}",
        options.prompts.display()
    );
    let _ = writeln!(
        out,
        "tier agreement, keyword and pattern rules only: {agree_rules}/{n} ({:.1}%)",
        pct(agree_rules)
    );
    let _ = writeln!(
        out,
        "tier agreement, with the similar_to rules:      {agree_both}/{n} ({:.1}%)",
        pct(agree_both)
    );
    let _ = writeln!(
        out,
        "nearest-example vote names the labelled class: {class_votes}/{n} ({:.1}%)",
        pct(class_votes)
    );
    let _ = writeln!(out, "tier agreement by class:");
    for (class, (agree, total)) in &by_class {
        let _ = writeln!(out, "  {class:<10} {agree}/{total}");
    }
    let _ = writeln!(out, "disagreements (routed tier first):");
    for miss in &misses {
        let _ = writeln!(out, "{miss}");
    }
    if options.sweep {
        let mins = [0.1_f32, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45];
        let header = format!("  k   {}", mins.map(|m| format!("{m:>6.2}")).join(""));
        let mut held_out = format!("{header}\n");
        let mut loo = format!("{header}\n");
        for k in [1, 3, 5, 7, 9, 11, 15] {
            let _ = write!(held_out, "  {k:<3} ");
            let _ = write!(loo, "  {k:<3} ");
            for min in mins {
                if let Some(examples) = policy.examples.as_mut() {
                    examples.k = k;
                    examples.min_similarity = min;
                    let _ = write!(loo, "{:>6.1}", 100.0 * examples.leave_one_out());
                }
                let mut agree = 0;
                for (prompt, vector) in labelled.prompt.iter().zip(&vectors) {
                    let routed = route(&policy, prompt, Some(vector))?;
                    agree += usize::from(routed.explanation.route.tier == prompt.tier);
                }
                let _ = write!(held_out, "{:>6.1}", pct(agree));
            }
            held_out.push('\n');
            loo.push('\n');
        }
        let _ = writeln!(
            out,
            "sweep, leave-one-out on the examples (class named by the others' vote, %): choose here\n{loo}"
        );
        let _ = writeln!(
            out,
            "sweep, tier agreement on these labelled prompts with the similar_to rules (%): report, do not tune\n{held_out}"
        );
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct LabelledPairs {
    pair: Vec<LabelledPair>,
}

#[derive(Debug, Deserialize)]
struct LabelledPair {
    a: String,
    b: String,
    should_hit: bool,
    kind: String,
}

/// Scores every labelled pair and reports hit and false-hit rates per threshold.
pub fn semantic(config: &Path, pairs: &Path) -> anyhow::Result<String> {
    let config = Config::load(config).map_err(|p| anyhow::anyhow!("{p}"))?;
    let embedder = load_embedder(&config)?;
    let labelled: LabelledPairs = toml::from_str(
        &std::fs::read_to_string(pairs)
            .with_context(|| format!("cannot read {}", pairs.display()))?,
    )
    .with_context(|| format!("cannot parse {}", pairs.display()))?;
    let texts: Vec<String> = labelled
        .pair
        .iter()
        .flat_map(|p| [p.a.clone(), p.b.clone()])
        .collect();
    let vectors = embedder.embed_all_blocking(&texts)?;
    // (similarity, passes the guards, pair)
    let scored: Vec<(f32, bool, &LabelledPair)> = labelled
        .pair
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            let score = similarity(&vectors[2 * i], &vectors[2 * i + 1]);
            let passes = Signature::of(&pair.a)
                .refuses(&Signature::of(&pair.b))
                .is_none();
            (score, passes, pair)
        })
        .collect();
    let paraphrases = scored.iter().filter(|s| s.2.should_hit).count();
    let look_alikes = scored.len() - paraphrases;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} pairs from {}: {paraphrases} paraphrases (should hit), {look_alikes} look-alikes (must not)",
        scored.len(),
        pairs.display()
    );
    let _ = writeln!(
        out,
        "threshold   hit rate (no guards / guards)   false-hit rate (no guards / guards)"
    );
    let rate = |k: usize, n: usize| 100.0 * k as f64 / n.max(1) as f64;
    for step in 0..=14 {
        let threshold = 0.60 + 0.025 * step as f32;
        let over = |should_hit: bool, guarded: bool| {
            scored
                .iter()
                .filter(|(s, passes, p)| {
                    p.should_hit == should_hit && *s >= threshold && (!guarded || *passes)
                })
                .count()
        };
        let _ = writeln!(
            out,
            "  {threshold:.3}     {:>5.1}% / {:>5.1}%                 {:>5.1}% / {:>5.1}%",
            rate(over(true, false), paraphrases),
            rate(over(true, true), paraphrases),
            rate(over(false, false), look_alikes),
            rate(over(false, true), look_alikes),
        );
    }
    let _ = writeln!(
        out,
        "look-alikes by kind: median similarity, refused by a guard"
    );
    let mut kinds: BTreeMap<&str, Vec<(f32, bool)>> = BTreeMap::new();
    for (score, passes, pair) in &scored {
        kinds
            .entry(pair.kind.as_str())
            .or_default()
            .push((*score, *passes));
    }
    for (kind, mut rows) in kinds {
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let median = rows[rows.len() / 2].0;
        let refused = rows.iter().filter(|r| !r.1).count();
        let _ = writeln!(
            out,
            "  {kind:<11} {:>3} pairs, median similarity {median:.3}, refused by a guard {refused}",
            rows.len()
        );
    }
    let _ = writeln!(out, "paraphrases a guard refuses (a lost hit each):");
    for (score, _, pair) in scored.iter().filter(|s| s.2.should_hit && !s.1) {
        let why = Signature::of(&pair.a)
            .refuses(&Signature::of(&pair.b))
            .map(|r| r.to_string())
            .unwrap_or_default();
        let _ = writeln!(out, "  {score:.3} {} / {} ({why})", pair.a, pair.b);
    }
    let _ = writeln!(
        out,
        "look-alikes that pass every guard, most similar first:"
    );
    let mut passing: Vec<_> = scored.iter().filter(|s| !s.2.should_hit && s.1).collect();
    passing.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (score, _, pair) in passing.iter().take(15) {
        let _ = writeln!(out, "  {score:.3} [{}] {} / {}", pair.kind, pair.a, pair.b);
    }
    Ok(out)
}

/// Embedding latency: one 64-token text alone, and 16 concurrent callers (batched), with
/// p50 and p99 over `rounds`.
pub fn embedding_latency(config: &Path, rounds: usize) -> anyhow::Result<String> {
    let config = Config::load(config).map_err(|p| anyhow::anyhow!("{p}"))?;
    let embedder = load_embedder(&config)?;
    // About 64 word pieces with [CLS] and [SEP].
    let text = "The gateway routes each chat request to a tier by policy rules and keeps \
                latency budgets; when the full model would miss the budget it degrades to \
                the small model or a cached reply, and it measures time to first token for \
                every request it serves.";
    // A typical chat question: about 16 word pieces.
    let short = "How do I turn on dark mode in Firefox on my laptop?";
    let mut out = String::new();
    for _ in 0..5 {
        embedder.embed_blocking(text)?;
    }
    let mut alone = Vec::new();
    let mut alone_short = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        embedder.embed_blocking(text)?;
        alone.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        embedder.embed_blocking(short)?;
        alone_short.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let concurrent: Vec<f64> = runtime.block_on(async {
        let mut all = Vec::new();
        for round in 0..rounds.div_ceil(16).max(4) {
            let calls = (0..16).map(|i| {
                let embedder = embedder.clone();
                // Distinct texts of about the same length, as 16 different requests would
                // be, new in every round: a repeated text is answered from memory.
                let text = format!("{text} {round} {i}");
                tokio::spawn(async move {
                    let started = Instant::now();
                    embedder.embed(&text).await.map(|_| started.elapsed())
                })
            });
            for call in futures::future::join_all(calls).await {
                if let Ok(Ok(elapsed)) = call {
                    all.push(elapsed.as_secs_f64() * 1000.0);
                }
            }
        }
        all
    });
    let quantiles = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99), v.len())
    };
    let (p50, p99, n) = quantiles(alone);
    let _ = writeln!(
        out,
        "embedding a 64-token text alone:        p50 {p50:.2} ms, p99 {p99:.2} ms ({n} calls)"
    );
    let (p50, p99, n) = quantiles(alone_short);
    let _ = writeln!(
        out,
        "embedding a 16-token question alone:    p50 {p50:.2} ms, p99 {p99:.2} ms ({n} calls)"
    );
    let (p50, p99, n) = quantiles(concurrent);
    let _ = writeln!(
        out,
        "16 concurrent callers (batched), each:  p50 {p50:.2} ms, p99 {p99:.2} ms ({n} calls)"
    );
    Ok(out)
}
