//! Classify each request and pick its tier by operator-written policies.
//!
//! ```text
//! request ─► Features::extract (text signals, caller) ─► Policy::route ─► Route
//!                                                          │ asks lazily, per tier
//!                                                          ▼
//!                                                  TokenCounter (the tier's own tokenizer)
//! ```
//!
//! The live [`Policy`] sits in a [`PolicyStore`]; a reload builds a whole new policy and
//! swaps it in, so a request keeps the `Arc<Policy>` it started with and an invalid file
//! never replaces a working one.

pub mod features;
pub mod policy;
pub mod reload;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub use features::{Caller, Features};
pub use policy::{CacheMode, Explanation, Policy, Route, TokenCounter};

use crate::engine::ChatMessage;
use crate::tomlfile::Problems;

/// Counts a conversation's prompt tokens on a tier's own tokenizer.
pub trait Tokenizers: Send + Sync {
    fn count(&self, tier: &str, messages: &[ChatMessage]) -> Result<u32, String>;
}

/// One request's messages bound to the tokenizers, as the policy's [`TokenCounter`].
/// Counts are remembered per tier for the whole request: routing, the token quota and
/// the TTFT prediction all ask, and tokenizing a long prompt costs milliseconds.
pub struct RequestTokens<'a> {
    tokenizers: &'a dyn Tokenizers,
    messages: &'a [ChatMessage],
    counted: Mutex<Vec<(String, Result<u32, String>)>>,
}

impl<'a> RequestTokens<'a> {
    pub fn new(tokenizers: &'a dyn Tokenizers, messages: &'a [ChatMessage]) -> Self {
        Self {
            tokenizers,
            messages,
            counted: Mutex::new(Vec::new()),
        }
    }
}

impl TokenCounter for RequestTokens<'_> {
    fn prompt_tokens(&self, tier: &str) -> Result<u32, String> {
        // Plain data behind the lock: a poisoned one is still consistent.
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, count)) = counted.iter().find(|(t, _)| t == tier) {
            return count.clone();
        }
        let count = self.tokenizers.count(tier, self.messages);
        counted.push((tier.to_owned(), count.clone()));
        count
    }
}

/// The policy now in force, and how to build the next one.
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    files: Vec<PathBuf>,
    tiers: Vec<String>,
}

impl PolicyStore {
    /// Loads `files` for the configured `tiers`; every problem in every file comes back.
    pub fn load(files: Vec<PathBuf>, tiers: Vec<String>) -> Result<Self, Problems> {
        let policy = Policy::load(&files, &tiers).map_err(Problems)?;
        Ok(Self {
            current: ArcSwap::from_pointee(policy),
            files,
            tiers,
        })
    }

    /// The policy to use for one whole request.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Re-reads the files. On any problem the policy in force stays.
    pub fn reload(&self) -> Result<(), Problems> {
        let policy = Policy::load(&self.files, &self.tiers).map_err(Problems)?;
        self.current.store(Arc::new(policy));
        Ok(())
    }
}
