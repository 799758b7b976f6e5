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

pub mod features;
pub mod policy;
pub mod reload;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use features::{Caller, Features};
pub use policy::{CacheMode, Explanation, Policy, Route, TokenCounter};

use crate::tomlfile::Problems;

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
