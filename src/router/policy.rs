//! Routing policies: ordered rules in `router-policies/*.toml`, first match wins, then the
//! defaults. Parsed in two steps (raw serde structs, then a validated [`Policy`]) so that an
//! operator sees every mistake in one run, each with file, line and key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use aho_corasick::AhoCorasick;
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::examples::{ExampleSet, RawSimilarity, Similar};
use super::features::{phrase_matcher, whole_word_matches, Caller, Features, SCRIPT_NAMES};
use crate::chat::{message_bytes, push_key_field, push_messages_key, ChatMessage};
use crate::tomlfile::{Problem, TomlFile};

/// How the reply cache treats a route (used by the budgets issue's cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Never read or write the cache.
    Off,
    /// Only requests whose output is reproducible: temperature 0 or a fixed seed.
    Deterministic,
    /// Every request; sampling parameters are still part of the key.
    Always,
    /// Like `always`, and on an exact miss a reply to a question that means the same
    /// (same scope, tier, sampling and earlier conversation; look-alikes refused).
    Semantic,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Off => "off",
            CacheMode::Deterministic => "deterministic",
            CacheMode::Always => "always",
            CacheMode::Semantic => "semantic",
        }
    }
}

/// What a matched rule (or the defaults) decides for a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub tier: String,
    /// The rule that matched, or `default`.
    pub rule: String,
    /// True when the request named this tier itself and the policy allows pinning.
    pub pinned: bool,
    pub ttft_ms: u64,
    pub total_ms: u64,
    /// Caps the request's `max_tokens` (and its default).
    pub max_tokens: Option<u32>,
    pub cache: CacheMode,
    pub cache_ttl_s: u64,
    /// How old an expired cached reply may be and still be served when every tier would
    /// breach its budget.
    pub max_stale_s: u64,
    /// Share cached replies across API keys (otherwise each key has its own).
    pub cache_shared: bool,
    /// `cache = "semantic"`: the least cosine similarity of a cached question to serve
    /// its reply.
    pub semantic_threshold: f32,
}

/// The default `semantic_threshold`: measured on `benches/semantic-pairs.toml` (README).
pub const DEFAULT_SEMANTIC_THRESHOLD: f32 = 0.875;

/// Prompt token counts per tier, computed only when a rule asks (tokenizing is the
/// costliest feature) and remembered for the rest of the evaluation.
pub trait TokenCounter {
    fn prompt_tokens(&self, tier: &str) -> Result<u32, String>;
}

// ---------------------------------------------------------------------------------------
// Raw file format

#[derive(Debug, Default, Deserialize)]
struct RawPolicyFile {
    #[serde(default)]
    defaults: RawOutcome,
    #[serde(default)]
    complexity: RawWeights,
    #[serde(default)]
    rule: Vec<RawRule>,
    similarity: Option<RawSimilarity>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct RawOutcome {
    tier: Option<String>,
    ttft_ms: Option<u64>,
    total_ms: Option<u64>,
    max_tokens: Option<u32>,
    cache: Option<CacheMode>,
    cache_ttl_s: Option<u64>,
    max_stale_s: Option<u64>,
    cache_shared: Option<bool>,
    semantic_threshold: Option<f32>,
    /// Only meaningful in `[defaults]`.
    allow_pinning: Option<bool>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize)]
pub struct RawWeights {
    code: Option<f64>,
    math: Option<f64>,
    reasoning: Option<f64>,
    system_prompt: Option<f64>,
    turn: Option<f64>,
    prompt_tokens_per_1k: Option<f64>,
    max_tokens_per_1k: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawRule {
    name: String,
    #[serde(default)]
    when: RawWhen,
    tier: Option<String>,
    ttft_ms: Option<u64>,
    total_ms: Option<u64>,
    max_tokens: Option<u32>,
    cache: Option<CacheMode>,
    cache_ttl_s: Option<u64>,
    max_stale_s: Option<u64>,
    cache_shared: Option<bool>,
    semantic_threshold: Option<f32>,
}

/// One name or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct RawWhen {
    hint: Option<Vec<String>>,
    api_keys: Option<Vec<String>>,
    tenants: Option<Vec<String>>,
    turns_min: Option<u32>,
    turns_max: Option<u32>,
    system_prompt: Option<bool>,
    system_prompt_chars_min: Option<u32>,
    max_tokens_min: Option<u32>,
    code: Option<bool>,
    math: Option<bool>,
    reasoning: Option<bool>,
    script: Option<Vec<String>>,
    keywords: Option<Vec<String>>,
    regex: Option<String>,
    complexity_min: Option<f64>,
    prompt_tokens_min: Option<u32>,
    prompt_tokens_max: Option<u32>,
    similar_to: Option<OneOrMany>,
}

// ---------------------------------------------------------------------------------------
// Validated policy

/// Weights of the complexity score: the sum of each present feature times its weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    pub code: f64,
    pub math: f64,
    pub reasoning: f64,
    pub system_prompt: f64,
    /// Per user turn after the first.
    pub turn: f64,
    pub prompt_tokens_per_1k: f64,
    pub max_tokens_per_1k: f64,
}

#[derive(Debug)]
struct Conditions {
    hint: Option<Vec<String>>,
    api_keys: Option<HashSet<String>>,
    tenants: Option<HashSet<String>>,
    turns_min: Option<u32>,
    turns_max: Option<u32>,
    system_prompt: Option<bool>,
    system_prompt_chars_min: Option<u32>,
    max_tokens_min: Option<u32>,
    code: Option<bool>,
    math: Option<bool>,
    reasoning: Option<bool>,
    script: Option<Vec<String>>,
    keywords: Option<(Vec<String>, AhoCorasick)>,
    regex: Option<Regex>,
    complexity_min: Option<f64>,
    prompt_tokens_min: Option<u32>,
    prompt_tokens_max: Option<u32>,
    similar_to: Option<Vec<String>>,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub file: PathBuf,
    pub line: Option<usize>,
    when: Conditions,
    pub route: Route,
}

impl Rule {
    /// Whether the rule asks `similar_to`.
    pub fn uses_similarity(&self) -> bool {
        self.when.similar_to.is_some()
    }
}

/// A validated set of rules from one or more files, immutable once built: a reload builds
/// a new one and swaps it in.
#[derive(Debug)]
pub struct Policy {
    pub files: Vec<PathBuf>,
    pub rules: Vec<Rule>,
    pub default: Route,
    pub allow_pinning: bool,
    pub weights: Weights,
    /// Labelled examples for `similar_to` rules (`[similarity]`).
    pub examples: Option<ExampleSet>,
    /// Routes of recent short requests, by [`route_key`]. A repeated request (every
    /// reply-cache hit is one) is routed again without extracting features, counting
    /// tokens or asking the examples, which cost more than the rest of a hit. It lives
    /// with this policy, so a reload starts empty.
    recent_routes: quick_cache::sync::Cache<String, Route>,
}

/// Requests whose routes a [`Policy`] keeps.
const RECENT_ROUTES: usize = 4096;
/// Longer requests are routed every time: the key would cost more memory than it saves.
const RECENT_ROUTE_MAX_BYTES: usize = 2048;

/// Everything a route depends on besides the policy: every message's role and text, the
/// requested `max_tokens`, the caller (API key, tenant, hint), and the pinned tier and
/// model (a pinned model counts tokens with its own vocabulary), each length-prefixed so
/// that no two requests share a key. `None` for a long request.
pub fn route_key(
    messages: &[ChatMessage],
    max_tokens: Option<u32>,
    caller: &Caller,
    pin: Option<(&str, Option<&str>)>,
) -> Option<String> {
    let bytes = message_bytes(messages);
    if bytes > RECENT_ROUTE_MAX_BYTES {
        return None;
    }
    let mut key = String::with_capacity(bytes + 64);
    let Caller {
        api_key,
        tenant,
        hint,
    } = caller;
    let max_tokens = max_tokens.map(|n| n.to_string());
    for field in [
        max_tokens.as_deref(),
        api_key.as_deref(),
        tenant.as_deref(),
        hint.as_deref(),
        pin.map(|(tier, _)| tier),
        pin.and_then(|(_, model)| model),
    ] {
        push_key_field(&mut key, field);
    }
    push_messages_key(&mut key, messages);
    Some(key)
}

/// Why a rule did not match: the first condition that failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Mismatch {
    Below {
        what: &'static str,
        value: f64,
        min: f64,
    },
    Above {
        what: &'static str,
        value: f64,
        max: f64,
    },
    Flag {
        what: &'static str,
        wanted: bool,
    },
    NotListed {
        what: &'static str,
        value: Option<String>,
    },
    /// The caller's API key is not one of the rule's (the key itself is never shown).
    KeyNotListed,
    NoKeyword,
    NoRegexMatch,
    /// No example was similar enough to vote.
    NoSimilarExample,
    /// A `similar_to` rule, and the request was not embedded.
    NotEmbedded,
    /// The rule's tier cannot serve this request.
    Unservable {
        tier: String,
        why: String,
    },
    Unknown {
        what: &'static str,
        error: String,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Below { what, value, min } => write!(f, "{what} {value} < min {min}"),
            Mismatch::Above { what, value, max } => write!(f, "{what} {value} > max {max}"),
            Mismatch::Flag { what, wanted: true } => write!(f, "no {what} found"),
            Mismatch::Flag {
                what,
                wanted: false,
            } => write!(f, "{what} found"),
            Mismatch::NotListed { what, value: None } => write!(f, "no {what} given"),
            Mismatch::NotListed {
                what,
                value: Some(v),
            } => write!(f, "{what} `{v}` not listed"),
            Mismatch::KeyNotListed => write!(f, "api key not listed"),
            Mismatch::NoKeyword => write!(f, "no keyword in the last user message"),
            Mismatch::NoRegexMatch => write!(f, "regex does not match the last user message"),
            Mismatch::NotEmbedded => {
                write!(f, "similar_to unknown: the request was not embedded")
            }
            Mismatch::NoSimilarExample => {
                write!(f, "no example is similar enough to the last user message")
            }
            Mismatch::Unknown { what, error } => write!(f, "{what} unknown: {error}"),
            Mismatch::Unservable { tier, why } => write!(f, "tier `{tier}` skipped: {why}"),
        }
    }
}

/// One rule as tried for an explanation.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    pub rule: String,
    pub file: PathBuf,
    pub line: Option<usize>,
    pub tier: String,
    pub matched: bool,
    /// For a rule that did not match: the first condition that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The whole story of one routing decision.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub policy: Vec<PathBuf>,
    pub features: Features,
    /// Token counts of the templated prompt, for each tier a rule asked about.
    pub prompt_tokens: BTreeMap<String, u32>,
    /// Complexity score per tier it was computed for (prompt tokens weigh in per tier).
    pub complexity: BTreeMap<String, f64>,
    pub rules: Vec<RuleTrace>,
    pub route: Route,
}

impl Policy {
    /// Loads and validates `files` in order: their rules are concatenated, and each
    /// file's `[defaults]` and `[complexity]` keys override the files before it. `tiers`
    /// are the configured tiers a rule may name.
    pub fn load(files: &[PathBuf], tiers: &[String]) -> Result<Policy, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut parsed = Vec::new();
        for path in files {
            match TomlFile::load::<RawPolicyFile>(path) {
                Ok(file) => parsed.push(file),
                Err(mut found) => problems.append(&mut found),
            }
        }
        if files.is_empty() {
            problems.push(Problem {
                file: PathBuf::new(),
                line: None,
                key: "router.policies".into(),
                message: "at least one policy file is required".into(),
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        build(parsed, tiers)
    }

    /// The route for a request: the first matching rule's, else the defaults. `pin` is a
    /// tier the request named itself.
    /// The route [`Policy::remember`] kept for this [`route_key`].
    pub fn remembered(&self, key: &str) -> Option<Route> {
        self.recent_routes.get(key)
    }

    /// Keeps `route` for a request with this [`route_key`]. Only for a route made with
    /// every input it asked for (token counts, the request's meaning): one made without
    /// them is not the route of that request.
    pub fn remember(&self, key: String, route: &Route) {
        self.recent_routes.insert(key, route.clone());
    }

    /// The route of a request: the first rule that matches, or the defaults; a pin the
    /// policy allows overrides the tier.
    pub fn route(
        &self,
        features: &Features,
        tokens: &dyn TokenCounter,
        pin: Option<&str>,
    ) -> Route {
        let mut memo = Memo::new(tokens);
        let route = self
            .rules
            .iter()
            .find(|rule| self.check(rule, features, &mut memo).is_ok())
            .map_or(&self.default, |rule| &rule.route);
        self.pinned(route, pin)
    }

    /// Like [`Policy::route`], recording every rule tried and why it did or did not match.
    pub fn explain(
        &self,
        features: &Features,
        tokens: &dyn TokenCounter,
        pin: Option<&str>,
    ) -> Explanation {
        let mut memo = Memo::new(tokens);
        let mut traces = Vec::new();
        let mut chosen = &self.default;
        for rule in &self.rules {
            let outcome = self.check(rule, features, &mut memo);
            traces.push(RuleTrace {
                rule: rule.name.clone(),
                file: rule.file.clone(),
                line: rule.line,
                tier: rule.route.tier.clone(),
                matched: outcome.is_ok(),
                reason: outcome.err().map(|m| m.to_string()),
            });
            if traces.last().is_some_and(|t| t.matched) {
                chosen = &rule.route;
                break;
            }
        }
        Explanation {
            policy: self.files.clone(),
            features: features.clone(),
            prompt_tokens: memo
                .counts
                .iter()
                .filter_map(|(tier, n)| Some((tier.clone(), *n.as_ref().ok()?)))
                .collect(),
            complexity: memo.scores.into_iter().collect(),
            rules: traces,
            route: self.pinned(chosen, pin),
        }
    }

    /// Whether a rule asks `similar_to`: then the request's last user message must be
    /// embedded before routing.
    pub fn needs_meaning(&self) -> bool {
        self.rules.iter().any(Rule::uses_similarity)
    }

    /// Whether routing `features` (not yet embedded) reaches a `similar_to` rule whose
    /// other conditions hold before any rule matches: only then does the route depend on
    /// the embedding. A request the keyword rules already decide is never embedded for
    /// routing.
    pub fn reaches_similar_to(&self, features: &Features, tokens: &dyn TokenCounter) -> bool {
        let mut memo = Memo::new(tokens);
        for rule in &self.rules {
            match self.check(rule, features, &mut memo) {
                Ok(()) => return false,
                Err(Mismatch::NotEmbedded) => return true,
                Err(_) => {}
            }
        }
        false
    }

    /// How the labelled examples vote on `vector` (the last user message's embedding).
    pub fn similar(&self, vector: &[f32]) -> Option<Similar> {
        self.examples
            .as_ref()
            .filter(|set| set.is_embedded())
            .map(|set| set.vote(vector))
    }

    fn pinned(&self, route: &Route, pin: Option<&str>) -> Route {
        match pin {
            Some(tier) if self.allow_pinning => Route {
                tier: tier.to_owned(),
                pinned: true,
                ..route.clone()
            },
            _ => route.clone(),
        }
    }

    /// Conditions are tried cheapest first; prompt tokens (a tokenizer pass) come last.
    fn check(&self, rule: &Rule, f: &Features, memo: &mut Memo<'_>) -> Result<(), Mismatch> {
        if let Some(why) = f.unservable_tiers.get(&rule.route.tier) {
            return Err(Mismatch::Unservable {
                tier: rule.route.tier.clone(),
                why: why.clone(),
            });
        }
        let when = &rule.when;
        if let Some(hints) = &when.hint {
            listed("route hint", f.hint.as_deref(), |h| {
                hints.iter().any(|x| x == h)
            })?;
        }
        if let Some(keys) = &when.api_keys {
            match &f.api_key {
                None => listed("api key", None, |_| false)?,
                Some(key) if !keys.contains(key) => return Err(Mismatch::KeyNotListed),
                Some(_) => {}
            }
        }
        if let Some(tenants) = &when.tenants {
            listed("tenant", f.tenant.as_deref(), |t| tenants.contains(t))?;
        }
        at_least("turns", f.turns, when.turns_min)?;
        at_most("turns", f.turns, when.turns_max)?;
        flag("system prompt", f.system_prompt, when.system_prompt)?;
        at_least(
            "system prompt chars",
            f.system_prompt_chars,
            when.system_prompt_chars_min,
        )?;
        at_least(
            "requested max_tokens",
            f.requested_max_tokens.unwrap_or(0),
            when.max_tokens_min,
        )?;
        flag("code", f.code, when.code)?;
        flag("math", f.math, when.math)?;
        flag("reasoning cue", f.reasoning, when.reasoning)?;
        if let Some(scripts) = &when.script {
            listed("script", Some(f.script), |s| scripts.iter().any(|x| x == s))?;
        }
        if let Some((_, matcher)) = &when.keywords {
            if whole_word_matches(matcher, &f.last_user).next().is_none() {
                return Err(Mismatch::NoKeyword);
            }
        }
        if let Some(regex) = &when.regex {
            if !regex.is_match(&f.last_user) {
                return Err(Mismatch::NoRegexMatch);
            }
        }
        if let Some(classes) = &when.similar_to {
            let Some(similar) = &f.similar else {
                return Err(Mismatch::NotEmbedded);
            };
            match &similar.class {
                None => return Err(Mismatch::NoSimilarExample),
                Some(class) => listed("nearest examples' class", Some(class), |c| {
                    classes.iter().any(|x| x == c)
                })?,
            }
        }
        let tier = rule.route.tier.as_str();
        if let Some(min) = when.complexity_min {
            let score = memo.complexity(tier, f, &self.weights)?;
            if score < min {
                return Err(Mismatch::Below {
                    what: "complexity",
                    value: score,
                    min,
                });
            }
        }
        if when.prompt_tokens_min.is_some() || when.prompt_tokens_max.is_some() {
            let tokens = memo.tokens(tier)?;
            at_least("prompt tokens", tokens, when.prompt_tokens_min)?;
            at_most("prompt tokens", tokens, when.prompt_tokens_max)?;
        }
        Ok(())
    }
}

fn listed(
    what: &'static str,
    value: Option<&str>,
    contains: impl Fn(&str) -> bool,
) -> Result<(), Mismatch> {
    match value {
        Some(v) if contains(v) => Ok(()),
        _ => Err(Mismatch::NotListed {
            what,
            value: value.map(str::to_owned),
        }),
    }
}

fn at_least<T: Into<f64> + Copy + PartialOrd>(
    what: &'static str,
    value: T,
    min: Option<T>,
) -> Result<(), Mismatch> {
    match min {
        Some(min) if value < min => Err(Mismatch::Below {
            what,
            value: value.into(),
            min: min.into(),
        }),
        _ => Ok(()),
    }
}

fn at_most<T: Into<f64> + Copy + PartialOrd>(
    what: &'static str,
    value: T,
    max: Option<T>,
) -> Result<(), Mismatch> {
    match max {
        Some(max) if value > max => Err(Mismatch::Above {
            what,
            value: value.into(),
            max: max.into(),
        }),
        _ => Ok(()),
    }
}

fn flag(what: &'static str, value: bool, wanted: Option<bool>) -> Result<(), Mismatch> {
    match wanted {
        Some(wanted) if value != wanted => Err(Mismatch::Flag { what, wanted }),
        _ => Ok(()),
    }
}

/// Token counts and complexity scores already computed in this evaluation.
struct Memo<'a> {
    counter: &'a dyn TokenCounter,
    counts: Vec<(String, Result<u32, String>)>,
    scores: Vec<(String, f64)>,
}

impl<'a> Memo<'a> {
    fn new(counter: &'a dyn TokenCounter) -> Self {
        Self {
            counter,
            counts: Vec::new(),
            scores: Vec::new(),
        }
    }

    fn tokens(&mut self, tier: &str) -> Result<u32, Mismatch> {
        let index = match self.counts.iter().position(|(t, _)| t == tier) {
            Some(index) => index,
            None => {
                self.counts
                    .push((tier.to_owned(), self.counter.prompt_tokens(tier)));
                self.counts.len() - 1
            }
        };
        self.counts[index]
            .1
            .clone()
            .map_err(|error| Mismatch::Unknown {
                what: "prompt tokens",
                error,
            })
    }

    fn complexity(&mut self, tier: &str, f: &Features, w: &Weights) -> Result<f64, Mismatch> {
        if let Some((_, score)) = self.scores.iter().find(|(t, _)| t == tier) {
            return Ok(*score);
        }
        let as_score = |present: bool, weight: f64| if present { weight } else { 0.0 };
        let mut score = as_score(f.code, w.code)
            + as_score(f.math, w.math)
            + as_score(f.reasoning, w.reasoning)
            + as_score(f.system_prompt, w.system_prompt)
            + f64::from(f.turns.saturating_sub(1)) * w.turn
            + f64::from(f.requested_max_tokens.unwrap_or(0)) / 1000.0 * w.max_tokens_per_1k;
        // Only tokenize when prompt length carries weight.
        if w.prompt_tokens_per_1k != 0.0 {
            score += f64::from(self.tokens(tier)?) / 1000.0 * w.prompt_tokens_per_1k;
        }
        self.scores.push((tier.to_owned(), score));
        Ok(score)
    }
}

// ---------------------------------------------------------------------------------------
// Validation

fn build(files: Vec<(RawPolicyFile, TomlFile)>, tiers: &[String]) -> Result<Policy, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut defaults = RawOutcome::default();
    let mut weights = RawWeights::default();
    let mut defaults_at: Option<&TomlFile> = None;
    for (raw, file) in &files {
        defaults = overlay(&defaults, &raw.defaults);
        weights = overlay_weights(&weights, &raw.complexity);
        if raw.defaults.tier.is_some() || defaults_at.is_none() {
            defaults_at = Some(file);
        }
    }
    let Some(defaults_file) = defaults_at else {
        return Err(problems);
    };
    let default = resolve_defaults(&defaults, tiers, defaults_file, &mut problems);
    // The last file with a `[similarity]` table provides the examples.
    let examples = files.iter().rev().find_map(|(raw, file)| {
        let raw = raw.similarity.as_ref()?;
        Some(ExampleSet::load(raw, file, &mut problems))
    });
    let examples = examples.flatten();

    let mut rules = Vec::new();
    let mut names: Vec<(String, PathBuf, Option<usize>)> = Vec::new();
    let mut catch_all: Option<(String, String)> = None;
    for (raw, file) in &files {
        for (i, raw_rule) in raw.rule.iter().enumerate() {
            let key = |field: &str| {
                if field.is_empty() {
                    format!("rule[{i}]")
                } else {
                    format!("rule[{i}].{field}")
                }
            };
            let line = file.line(&key(""));
            let at = |l: Option<usize>| match l {
                Some(l) => format!("{}:{l}", file.path.display()),
                None => file.path.display().to_string(),
            };
            if raw_rule.name.trim().is_empty() || raw_rule.name == "default" {
                problems.push(
                    file.problem(key("name"), "must be a non-empty name other than `default`"),
                );
            } else if let Some((_, other_file, other_line)) =
                names.iter().find(|(n, _, _)| *n == raw_rule.name)
            {
                let other = match other_line {
                    Some(l) => format!("{}:{l}", other_file.display()),
                    None => other_file.display().to_string(),
                };
                problems.push(file.problem(
                    key("name"),
                    format!(
                        "`{}` is already the name of the rule at {other}",
                        raw_rule.name
                    ),
                ));
            }
            names.push((raw_rule.name.clone(), file.path.clone(), line));
            if let Some((name, place)) = &catch_all {
                problems.push(file.problem(
                    key(""),
                    format!(
                        "rule `{}` can never match: rule `{name}` at {place} has no conditions and matches every request",
                        raw_rule.name
                    ),
                ));
            }
            let when = conditions(&raw_rule.when, file, &key, &mut problems);
            if let Some(classes) = &when.similar_to {
                match &examples {
                    None => problems.push(file.problem(
                        key("when.similar_to"),
                        "needs labelled examples: add a [similarity] table with `examples` files or `classes`",
                    )),
                    Some(set) => {
                        for class in classes.iter().filter(|c| !set.classes.contains(c)) {
                            problems.push(file.problem(
                                key("when.similar_to"),
                                format!(
                                    "no examples of class `{class}` (classes: {})",
                                    set.classes.join(", ")
                                ),
                            ));
                        }
                    }
                }
            }
            let tier = raw_rule
                .tier
                .clone()
                .unwrap_or_else(|| default.tier.clone());
            if raw_rule.tier.is_some() && !tiers.contains(&tier) {
                problems.push(file.problem(
                    key("tier"),
                    format!("unknown tier `{tier}` (configured: {})", tiers.join(", ")),
                ));
            }
            let route = Route {
                tier,
                rule: raw_rule.name.clone(),
                pinned: false,
                ttft_ms: raw_rule.ttft_ms.unwrap_or(default.ttft_ms),
                total_ms: raw_rule.total_ms.unwrap_or(default.total_ms),
                max_tokens: raw_rule.max_tokens.or(default.max_tokens),
                cache: raw_rule.cache.unwrap_or(default.cache),
                cache_ttl_s: raw_rule.cache_ttl_s.unwrap_or(default.cache_ttl_s),
                max_stale_s: raw_rule.max_stale_s.unwrap_or(default.max_stale_s),
                cache_shared: raw_rule.cache_shared.unwrap_or(default.cache_shared),
                semantic_threshold: raw_rule
                    .semantic_threshold
                    .unwrap_or(default.semantic_threshold),
            };
            check_budgets(&route, file, &key, &mut problems);
            // Judged on what was written, so a rule whose regex failed to compile is not
            // mistaken for a catch-all.
            if raw_rule.when == RawWhen::default() && catch_all.is_none() {
                catch_all = Some((raw_rule.name.clone(), at(line)));
            }
            rules.push(Rule {
                name: raw_rule.name.clone(),
                file: file.path.clone(),
                line,
                when,
                route,
            });
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Policy {
        files: files.iter().map(|(_, f)| f.path.clone()).collect(),
        rules,
        default,
        allow_pinning: defaults.allow_pinning.unwrap_or(true),
        weights: Weights {
            code: weights.code.unwrap_or(0.0),
            math: weights.math.unwrap_or(0.0),
            reasoning: weights.reasoning.unwrap_or(0.0),
            system_prompt: weights.system_prompt.unwrap_or(0.0),
            turn: weights.turn.unwrap_or(0.0),
            prompt_tokens_per_1k: weights.prompt_tokens_per_1k.unwrap_or(0.0),
            max_tokens_per_1k: weights.max_tokens_per_1k.unwrap_or(0.0),
        },
        examples,
        recent_routes: quick_cache::sync::Cache::new(RECENT_ROUTES),
    })
}

fn overlay(base: &RawOutcome, top: &RawOutcome) -> RawOutcome {
    RawOutcome {
        tier: top.tier.clone().or(base.tier.clone()),
        ttft_ms: top.ttft_ms.or(base.ttft_ms),
        total_ms: top.total_ms.or(base.total_ms),
        max_tokens: top.max_tokens.or(base.max_tokens),
        cache: top.cache.or(base.cache),
        cache_ttl_s: top.cache_ttl_s.or(base.cache_ttl_s),
        max_stale_s: top.max_stale_s.or(base.max_stale_s),
        cache_shared: top.cache_shared.or(base.cache_shared),
        semantic_threshold: top.semantic_threshold.or(base.semantic_threshold),
        allow_pinning: top.allow_pinning.or(base.allow_pinning),
    }
}

fn overlay_weights(base: &RawWeights, top: &RawWeights) -> RawWeights {
    RawWeights {
        code: top.code.or(base.code),
        math: top.math.or(base.math),
        reasoning: top.reasoning.or(base.reasoning),
        system_prompt: top.system_prompt.or(base.system_prompt),
        turn: top.turn.or(base.turn),
        prompt_tokens_per_1k: top.prompt_tokens_per_1k.or(base.prompt_tokens_per_1k),
        max_tokens_per_1k: top.max_tokens_per_1k.or(base.max_tokens_per_1k),
    }
}

fn resolve_defaults(
    raw: &RawOutcome,
    tiers: &[String],
    file: &TomlFile,
    problems: &mut Vec<Problem>,
) -> Route {
    let mut required = |key: &str, present: bool| {
        if !present {
            problems.push(file.problem(
                format!("defaults.{key}"),
                "required: the route for requests no rule matches",
            ));
        }
    };
    required("tier", raw.tier.is_some());
    required("ttft_ms", raw.ttft_ms.is_some());
    required("total_ms", raw.total_ms.is_some());
    let route = Route {
        tier: raw.tier.clone().unwrap_or_default(),
        rule: "default".into(),
        pinned: false,
        ttft_ms: raw.ttft_ms.unwrap_or(0),
        total_ms: raw.total_ms.unwrap_or(0),
        max_tokens: raw.max_tokens,
        cache: raw.cache.unwrap_or(CacheMode::Deterministic),
        cache_ttl_s: raw.cache_ttl_s.unwrap_or(300),
        max_stale_s: raw.max_stale_s.unwrap_or(0),
        cache_shared: raw.cache_shared.unwrap_or(false),
        semantic_threshold: raw.semantic_threshold.unwrap_or(DEFAULT_SEMANTIC_THRESHOLD),
    };
    if raw.tier.is_some() && !tiers.contains(&route.tier) {
        problems.push(file.problem(
            "defaults.tier",
            format!(
                "unknown tier `{}` (configured: {})",
                route.tier,
                tiers.join(", ")
            ),
        ));
    }
    if raw.ttft_ms.is_some() && raw.total_ms.is_some() {
        check_budgets(&route, file, &|f: &str| format!("defaults.{f}"), problems);
    }
    route
}

fn check_budgets(
    route: &Route,
    file: &TomlFile,
    key: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) {
    if route.ttft_ms == 0 {
        problems.push(file.problem(key("ttft_ms"), "must be at least 1"));
    }
    if route.total_ms < route.ttft_ms {
        // Point at whichever of the two this table wrote (the other was inherited).
        let written = if file.has(&key("total_ms")) {
            "total_ms"
        } else {
            "ttft_ms"
        };
        problems.push(file.problem(
            key(written),
            format!(
                "{} ms is less than the time-to-first-token budget ({} ms)",
                route.total_ms, route.ttft_ms
            ),
        ));
    }
    if route.max_tokens == Some(0) {
        problems.push(file.problem(key("max_tokens"), "must be at least 1"));
    }
    if !(0.0..=1.0).contains(&route.semantic_threshold) {
        problems.push(file.problem(
            key("semantic_threshold"),
            "a cosine similarity between 0 and 1",
        ));
    }
}

fn conditions(
    raw: &RawWhen,
    file: &TomlFile,
    key: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) -> Conditions {
    let when = |field: &str| key(&format!("when.{field}"));
    let mut bounds = |field: &str, min: Option<u32>, max: Option<u32>| {
        if let (Some(min), Some(max)) = (min, max) {
            if min > max {
                problems.push(file.problem(
                    when(&format!("{field}_min")),
                    format!("{min} is above {field}_max ({max}), so the rule can never match"),
                ));
            }
        }
    };
    bounds("turns", raw.turns_min, raw.turns_max);
    bounds(
        "prompt_tokens",
        raw.prompt_tokens_min,
        raw.prompt_tokens_max,
    );

    let mut non_empty = |field: &str, list: &Option<Vec<String>>| {
        if list.as_ref().is_some_and(|l| l.is_empty()) {
            problems.push(file.problem(
                when(field),
                "an empty list matches nothing; leave the key out instead",
            ));
        }
    };
    non_empty("hint", &raw.hint);
    non_empty("api_keys", &raw.api_keys);
    non_empty("tenants", &raw.tenants);
    non_empty("script", &raw.script);
    non_empty("keywords", &raw.keywords);
    let similar_to = raw.similar_to.clone().map(OneOrMany::into_vec);
    non_empty("similar_to", &similar_to);

    if let Some(scripts) = &raw.script {
        for script in scripts {
            if !SCRIPT_NAMES.contains(&script.as_str()) {
                problems.push(file.problem(
                    when("script"),
                    format!(
                        "unknown script `{script}` (known: {})",
                        SCRIPT_NAMES.join(", ")
                    ),
                ));
            }
        }
    }
    let regex = raw.regex.as_ref().and_then(|pattern| {
        Regex::new(pattern)
            .map_err(|e| {
                // regex's message spans several lines with a caret; keep its last line.
                let detail = e.to_string();
                let detail = detail.lines().last().unwrap_or("invalid").trim().to_owned();
                problems.push(file.problem(when("regex"), format!("invalid regex: {detail}")));
            })
            .ok()
    });
    Conditions {
        hint: raw
            .hint
            .as_ref()
            .map(|h| h.iter().map(|x| x.to_lowercase()).collect()),
        api_keys: raw.api_keys.as_ref().map(|k| k.iter().cloned().collect()),
        tenants: raw.tenants.as_ref().map(|t| t.iter().cloned().collect()),
        turns_min: raw.turns_min,
        turns_max: raw.turns_max,
        system_prompt: raw.system_prompt,
        system_prompt_chars_min: raw.system_prompt_chars_min,
        max_tokens_min: raw.max_tokens_min,
        code: raw.code,
        math: raw.math,
        reasoning: raw.reasoning,
        script: raw.script.clone(),
        keywords: raw
            .keywords
            .as_ref()
            .filter(|k| !k.is_empty())
            .map(|k| (k.clone(), phrase_matcher(k))),
        regex,
        complexity_min: raw.complexity_min,
        prompt_tokens_min: raw.prompt_tokens_min,
        prompt_tokens_max: raw.prompt_tokens_max,
        similar_to,
    }
}

/// The policy files a config names, resolved against the config's directory.
pub fn resolve_paths(base: &Path, files: &[PathBuf]) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| {
            if f.is_absolute() {
                f.clone()
            } else {
                base.join(f)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, Role};
    use crate::router::Caller;

    /// Counts one token per four bytes: enough to exercise token thresholds.
    struct ByteTokens(usize);

    impl TokenCounter for ByteTokens {
        fn prompt_tokens(&self, _tier: &str) -> Result<u32, String> {
            Ok((self.0 / 4) as u32)
        }
    }

    const TIERS: [&str; 2] = ["fast", "full"];

    fn tiers() -> Vec<String> {
        TIERS.iter().map(|t| t.to_string()).collect()
    }

    const HEADER: &str = "[defaults]\ntier = \"fast\"\nttft_ms = 1000\ntotal_ms = 5000\n";

    /// Writes `text` to a temporary policy file and loads it.
    fn load(text: &str) -> (Result<Policy, Vec<Problem>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).expect("write policy");
        (Policy::load(&[path], &tiers()), dir)
    }

    fn problems(text: &str) -> Vec<(Option<usize>, String, String)> {
        let (result, _dir) = load(text);
        result
            .expect_err("policy should be rejected")
            .into_iter()
            .map(|p| {
                assert!(p.file.ends_with("p.toml"), "{p}");
                (p.line, p.key, p.message)
            })
            .collect()
    }

    fn features(text: &str) -> Features {
        let messages = [ChatMessage {
            role: Role::User,
            content: text.to_owned(),
        }];
        Features::extract(&messages, None, Caller::default())
    }

    const SIMILAR: &str = r#"
[[rule]]
name = "code"
when = { code = true }
tier = "full"

[[rule]]
name = "by-meaning"
when = { similar_to = "code" }
tier = "full"

[similarity]
classes = { code = ["fix my script"], chat = ["hello there"] }
"#;

    #[test]
    fn only_requests_that_reach_a_similar_to_rule_need_embedding() {
        let (policy, _dir) = load(&format!("{HEADER}{SIMILAR}"));
        let policy = policy.expect("valid");
        assert!(policy.needs_meaning());
        let tokens = ByteTokens(10);
        // The keyword rule decides first: no embedding needed.
        let code = features("```rust\nfn main() {}\n```");
        assert!(!policy.reaches_similar_to(&code, &tokens));
        // Chit-chat reaches the similar_to rule, which cannot be decided without one.
        assert!(policy.reaches_similar_to(&features("hello, how are you"), &tokens));
        // Without an embedding model, the rule is a problem at load, named.
        let missing = crate::router::meaning_without_embedder(&policy);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].key, "rule `by-meaning`.when.similar_to");
        let (semantic, _dir) = load(&format!("{HEADER}cache = \"semantic\"\n"));
        let missing = crate::router::meaning_without_embedder(&semantic.expect("valid"));
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].key, "defaults.cache");
        let explained = policy.explain(&features("hello"), &tokens, None);
        assert_eq!(explained.route.rule, "default");
        assert_eq!(
            explained.rules[1].reason.as_deref(),
            Some("similar_to unknown: the request was not embedded")
        );
    }

    #[test]
    fn similar_to_needs_examples_of_each_class_it_names() {
        let found = problems(&format!(
            "{HEADER}[[rule]]\nname = \"x\"\nwhen = {{ similar_to = \"maths\" }}\n[similarity]\nclasses = {{ code = [\"a\"] }}\n"
        ));
        assert!(
            found
                .iter()
                .any(|(_, key, message)| key == "rule[0].when.similar_to"
                    && message.contains("no examples of class `maths`")),
            "{found:?}"
        );
        let found = problems(&format!(
            "{HEADER}[[rule]]\nname = \"x\"\nwhen = {{ similar_to = \"code\" }}\n"
        ));
        assert!(
            found
                .iter()
                .any(|(_, _, message)| message.contains("needs labelled examples")),
            "{found:?}"
        );
    }

    #[test]
    fn bad_toml_has_file_and_line() {
        let found = problems(&format!(
            "{HEADER}\n[[rule]]\nname = \"x\ntier = \"full\"\n"
        ));
        assert_eq!(found[0].0, Some(7), "{found:?}");
    }

    #[test]
    fn unknown_keys_are_all_reported_with_lines() {
        let found = problems(&format!(
            "{HEADER}\n[[rule]]\nname = \"a\"\ntier = \"full\"\nwhen = {{ cod = true }}\n\n[[rule]]\nname = \"b\"\ntierr = \"full\"\n"
        ));
        let keys: Vec<_> = found.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
        assert_eq!(
            keys,
            [(Some(9), "rule[0].when.cod"), (Some(13), "rule[1].tierr")]
        );
    }

    #[test]
    fn bad_regex_unknown_tier_and_budget_errors_come_together() {
        let found = problems(&format!(
            "{HEADER}\n[[rule]]\nname = \"a\"\nwhen = {{ regex = \"(unclosed\" }}\ntier = \"huge\"\n\n[[rule]]\nname = \"b\"\nwhen = {{ code = true }}\nttft_ms = 9000\n"
        ));
        let keys: Vec<_> = found.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
        assert_eq!(
            keys,
            [
                (Some(8), "rule[0].when.regex"),
                (Some(9), "rule[0].tier"),
                (Some(14), "rule[1].ttft_ms"),
            ],
            "{found:?}"
        );
        assert!(found[0].2.contains("invalid regex"), "{found:?}");
        assert!(found[1].2.contains("unknown tier `huge`"), "{found:?}");
    }

    #[test]
    fn rule_after_a_catch_all_is_unreachable() {
        let found = problems(&format!(
            "{HEADER}\n[[rule]]\nname = \"everything\"\ntier = \"full\"\n\n[[rule]]\nname = \"never\"\nwhen = {{ code = true }}\n"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, Some(10));
        assert_eq!(found[0].1, "rule[1]");
        assert!(
            found[0].2.contains("rule `everything` at") && found[0].2.contains(":6"),
            "{found:?}"
        );
    }

    #[test]
    fn missing_defaults_and_duplicate_names_are_reported() {
        let found = problems(
            "[[rule]]\nname = \"a\"\nwhen = { code = true }\ntier = \"full\"\n\n[[rule]]\nname = \"a\"\nwhen = { math = true }\ntier = \"full\"\n",
        );
        let keys: Vec<_> = found.iter().map(|(_, k, _)| k.as_str()).collect();
        assert!(keys.contains(&"defaults.tier"), "{found:?}");
        assert!(keys.contains(&"rule[1].name"), "{found:?}");
    }

    #[test]
    fn first_match_wins_and_rules_inherit_defaults() {
        let (policy, _dir) = load(&format!(
            "{HEADER}max_tokens = 256\n\n[[rule]]\nname = \"code\"\nwhen = {{ code = true }}\ntier = \"full\"\nttft_ms = 3000\n\n[[rule]]\nname = \"long\"\nwhen = {{ prompt_tokens_min = 100 }}\ntier = \"full\"\n"
        ));
        let policy = policy.expect("valid");
        let code = features("```rust\nfn main() {}\n```");
        let route = policy.route(&code, &ByteTokens(1000), None);
        assert_eq!((route.tier.as_str(), route.rule.as_str()), ("full", "code"));
        assert_eq!((route.ttft_ms, route.total_ms), (3000, 5000));
        assert_eq!(route.max_tokens, Some(256));

        let chat = features("hello");
        let long = policy.route(&chat, &ByteTokens(400), None);
        assert_eq!(long.rule, "long");
        let short = policy.route(&chat, &ByteTokens(8), None);
        assert_eq!(
            (short.tier.as_str(), short.rule.as_str()),
            ("fast", "default")
        );
    }

    #[test]
    fn explanation_gives_the_first_failing_condition_of_each_rule_tried() {
        let (policy, _dir) = load(&format!(
            "{HEADER}\n[[rule]]\nname = \"keys\"\nwhen = {{ api_keys = [\"k1\"] }}\ntier = \"full\"\n\n[[rule]]\nname = \"big\"\nwhen = {{ keywords = [\"contract\"], prompt_tokens_min = 50 }}\ntier = \"full\"\n\n[[rule]]\nname = \"legal\"\nwhen = {{ keywords = [\"contract\"] }}\ntier = \"full\"\n\n[[rule]]\nname = \"after\"\nwhen = {{ code = true }}\n"
        ));
        let policy = policy.expect("valid");
        let f = features("Please review this Contract for me");
        let e = policy.explain(&f, &ByteTokens(40), None);
        let trace: Vec<_> = e
            .rules
            .iter()
            .map(|r| {
                (
                    r.rule.as_str(),
                    r.matched,
                    r.reason.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            trace,
            [
                ("keys", false, "no api key given".to_owned()),
                ("big", false, "prompt tokens 10 < min 50".to_owned()),
                ("legal", true, String::new()),
            ]
        );
        assert_eq!(e.route.rule, "legal");
        assert_eq!(e.prompt_tokens.get("full"), Some(&10));
        assert_eq!(e.rules[1].line, Some(11));
    }

    #[test]
    fn pinning_is_honoured_only_when_allowed() {
        let (allowed, _a) = load(HEADER);
        let f = features("hi");
        let route = allowed
            .expect("valid")
            .route(&f, &ByteTokens(4), Some("full"));
        assert!(route.pinned);
        assert_eq!(route.tier, "full");

        let (denied, _b) = load(&format!("{HEADER}allow_pinning = false\n"));
        let route = denied
            .expect("valid")
            .route(&f, &ByteTokens(4), Some("full"));
        assert!(!route.pinned);
        assert_eq!(route.tier, "fast");
    }

    #[test]
    fn complexity_adds_weights_and_counts_tokens_per_tier() {
        let (policy, _dir) = load(&format!(
            "{HEADER}\n[complexity]\ncode = 2.0\nprompt_tokens_per_1k = 1.0\n\n[[rule]]\nname = \"complex\"\nwhen = {{ complexity_min = 2.5 }}\ntier = \"full\"\n"
        ));
        let policy = policy.expect("valid");
        let code = features("```\nx\n```");
        // 2.0 for code + 1.0 per 1k tokens: 400 tokens is 2.4, 600 is 2.6.
        assert_eq!(policy.route(&code, &ByteTokens(1600), None).rule, "default");
        assert_eq!(policy.route(&code, &ByteTokens(2400), None).rule, "complex");
    }

    #[test]
    fn route_keys_differ_in_anything_routing_reads() {
        use crate::chat::Role;
        let message = |role, content: &str| ChatMessage {
            role,
            content: content.to_owned(),
        };
        let caller = |key: Option<&str>, hint: Option<&str>| Caller {
            api_key: key.map(str::to_owned),
            tenant: None,
            hint: hint.map(str::to_owned),
        };
        let hello = [message(Role::User, "hello")];
        let base = route_key(&hello, Some(16), &caller(None, None), None);
        let variants = [
            route_key(&hello, None, &caller(None, None), None),
            route_key(&hello, Some(16), &caller(Some("k"), None), None),
            route_key(&hello, Some(16), &caller(None, Some("full")), None),
            route_key(&hello, Some(16), &caller(None, None), Some(("full", None))),
            route_key(
                &hello,
                Some(16),
                &caller(None, None),
                Some(("full", Some("gemma"))),
            ),
            route_key(
                &[message(Role::System, "hello")],
                Some(16),
                &caller(None, None),
                None,
            ),
            route_key(
                &[message(Role::User, "hel"), message(Role::User, "lo")],
                Some(16),
                &caller(None, None),
                None,
            ),
        ];
        assert!(base.is_some());
        for variant in &variants {
            assert!(variant.is_some());
            assert_ne!(variant, &base);
        }
        assert_eq!(route_key(&hello, Some(16), &caller(None, None), None), base);
        let long = [message(Role::User, &"x".repeat(RECENT_ROUTE_MAX_BYTES))];
        assert_eq!(route_key(&long, None, &caller(None, None), None), None);
    }
}
