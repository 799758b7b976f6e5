//! Classify each request and pick its tier by operator-written policies.
//!
//! ```text
//! request ─► Features::extract (text signals, caller) ─► Policy::route ─► Route
//!                                                          │ asks lazily, per tier
//!                                                          ▼
//!                                  TokenCounter (the tier's own tokenizer, from crate::tiers)
//! ```
//!
//! The live [`Policy`] sits in a [`PolicyStore`]; a reload builds a whole new policy and
//! swaps it in, so a request keeps the `Arc<Policy>` it started with and an invalid file
//! never replaces a working one.

pub mod examples;
pub mod features;
pub mod policy;
pub mod reload;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use examples::Similar;
pub use features::{Caller, Features};
pub use policy::{route_key, CacheMode, Explanation, Policy, Route, TokenCounter};

use crate::embed::Embedder;
use crate::tomlfile::{Problem, Problems};

/// The policy now in force, and how to build the next one.
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    files: Vec<PathBuf>,
    tiers: Vec<String>,
    embedder: Option<Arc<Embedder>>,
}

impl PolicyStore {
    /// Loads `files` for the configured `tiers`; every problem in every file comes back.
    pub fn load(files: Vec<PathBuf>, tiers: Vec<String>) -> Result<Self, Problems> {
        Self::load_with(files, tiers, None)
    }

    /// Like [`PolicyStore::load`], embedding the policy's labelled examples with
    /// `embedder`. Blocks on the embedding thread: call it from a blocking thread.
    pub fn load_with(
        files: Vec<PathBuf>,
        tiers: Vec<String>,
        embedder: Option<Arc<Embedder>>,
    ) -> Result<Self, Problems> {
        let policy = build(&files, &tiers, embedder.as_deref())?;
        Ok(Self {
            current: ArcSwap::from_pointee(policy),
            files,
            tiers,
            embedder,
        })
    }

    /// The embedding model requests are embedded with, when one is loaded.
    pub fn embedder(&self) -> Option<&Arc<Embedder>> {
        self.embedder.as_ref()
    }

    /// The policy to use for one whole request.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The policy files and the example files the current policy reads: a change to any
    /// of them reloads.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = self.files.clone();
        if let Some(examples) = &self.current().examples {
            files.extend(examples.files.iter().cloned());
        }
        files
    }

    /// Re-reads the files. On any problem the policy in force stays. Blocks on the
    /// embedding thread for new examples: call it from a blocking thread.
    pub fn reload(&self) -> Result<(), Problems> {
        let policy = build(&self.files, &self.tiers, self.embedder.as_deref())?;
        self.current.store(Arc::new(policy));
        Ok(())
    }
}

/// Loads the policy and embeds its examples.
fn build(
    files: &[PathBuf],
    tiers: &[String],
    embedder: Option<&Embedder>,
) -> Result<Policy, Problems> {
    let mut policy = Policy::load(files, tiers).map_err(Problems)?;
    match (policy.examples.as_mut(), embedder) {
        (Some(examples), Some(embedder)) => examples.embed(embedder).map_err(|err| {
            Problems(vec![Problem {
                file: files.last().cloned().unwrap_or_default(),
                line: None,
                key: "similarity".into(),
                message: format!("embedding the examples failed: {err}"),
            }])
        })?,
        (_, None) => {
            let problems = meaning_without_embedder(&policy);
            if !problems.is_empty() {
                return Err(Problems(problems));
            }
        }
        _ => {}
    }
    Ok(policy)
}

/// What a policy asks of an embedding model that is not configured: `similar_to` rules
/// and `cache = "semantic"` routes, each a problem naming its rule.
pub fn meaning_without_embedder(policy: &Policy) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut add = |file: &PathBuf, line, key: String, what: &str| {
        problems.push(Problem {
            file: file.clone(),
            line,
            key,
            message: format!(
                "{what} needs the embedding model: configure [embedding] in the config"
            ),
        })
    };
    let default_file = policy.files.last().cloned().unwrap_or_default();
    if policy.default.cache == CacheMode::Semantic {
        add(
            &default_file,
            None,
            "defaults.cache".into(),
            "cache = \"semantic\"",
        );
    }
    for rule in &policy.rules {
        if rule.route.cache == CacheMode::Semantic && policy.default.cache != CacheMode::Semantic {
            add(
                &rule.file,
                rule.line,
                format!("rule `{}`.cache", rule.name),
                "cache = \"semantic\"",
            );
        }
        if rule.uses_similarity() {
            add(
                &rule.file,
                rule.line,
                format!("rule `{}`.when.similar_to", rule.name),
                "`similar_to`",
            );
        }
    }
    problems
}
