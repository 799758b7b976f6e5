//! The tiers registry: which backend answers for each tier and each model id, the order
//! tiers degrade in, and exact prompt-token counts on each tier's own tokenizer.
//!
//! A backend is anything that implements [`Engine`]: the in-process llama.cpp engine today,
//! a fleet of remote endpoints later. Adding a kind of backend means implementing that one
//! trait and passing it to [`Tiers::new`]; nothing above this module changes.
//!
//! **How `model` resolves** (one rule, used by chat, `/v1/route` and `tiergate route`):
//! `auto` leaves the tier to the routing policy; a configured model id pins that exact
//! model; otherwise a tier name pins that tier's first model. Model ids are checked first,
//! so a model whose id equals another tier's name is still reachable by its id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::chat::ChatMessage;
use crate::engine::Engine;
use crate::router::TokenCounter;

/// Backends in config order, which is also the degrade order: a tier degrades to the tiers
/// listed before it, nearest first.
pub struct Tiers {
    backends: Vec<Arc<dyn Engine>>,
}

/// What a request's `model` named, when it named something other than `auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub tier: String,
    /// Set when the request named a model id: that model answers, not the tier's first.
    pub model: Option<String>,
}

/// A prompt too large for every tier, found from its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the messages ({bytes} bytes) take at least {min_tokens} tokens, more than any model's \
     maximum context length ({largest_context} tokens)"
)]
pub struct TooLarge {
    pub bytes: usize,
    pub min_tokens: u64,
    pub largest_context: u32,
}

/// `model` named nothing configured: the names that would have worked come with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model `{requested}` does not exist; available: {}", available.join(", "))]
pub struct UnknownModel {
    pub requested: String,
    pub available: Vec<String>,
}

/// Why `backend` cannot serve a request that calls tools or asks for several choices.
pub fn unable_to_serve(backend: &dyn Engine, tools: bool, choices: u32) -> Option<String> {
    let tools = tools
        .then(|| {
            backend
                .calls_tools()
                .err()
                .map(|why| format!("cannot call tools: {why}"))
        })
        .flatten();
    tools.or_else(|| {
        (choices > 1)
            .then(|| {
                backend
                    .serves_choices()
                    .err()
                    .map(|why| format!("`n` > 1: {why}"))
            })
            .flatten()
    })
}

impl Tiers {
    pub fn new(backends: Vec<Arc<dyn Engine>>) -> Self {
        Self { backends }
    }

    /// Every backend, in config order.
    pub fn backends(&self) -> &[Arc<dyn Engine>] {
        &self.backends
    }

    /// Tier names in config order, each once.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for backend in &self.backends {
            let tier = &backend.info().tier;
            if !names.contains(tier) {
                names.push(tier.clone());
            }
        }
        names
    }

    /// Resolves a request's `model` by the rule in the module docs: `None` for `auto`.
    pub fn resolve(&self, requested: &str) -> Result<Option<Pin>, UnknownModel> {
        if requested == "auto" {
            return Ok(None);
        }
        if let Some(backend) = self.backends.iter().find(|b| b.info().id == requested) {
            return Ok(Some(Pin {
                tier: backend.info().tier.clone(),
                model: Some(requested.to_owned()),
            }));
        }
        if self.backends.iter().any(|b| b.info().tier == requested) {
            return Ok(Some(Pin {
                tier: requested.to_owned(),
                model: None,
            }));
        }
        Err(UnknownModel {
            requested: requested.to_owned(),
            available: self.model_names(),
        })
    }

    /// The backend that answers for `tier`: the named `model` when the request pinned one
    /// in this tier, else the tier's first model.
    pub fn backend(&self, tier: &str, model: Option<&str>) -> Option<&Arc<dyn Engine>> {
        let in_tier = |b: &&Arc<dyn Engine>| b.info().tier == tier;
        model
            .and_then(|id| {
                self.backends
                    .iter()
                    .filter(in_tier)
                    .find(|b| b.info().id == id)
            })
            .or_else(|| self.backends.iter().find(in_tier))
    }

    /// Each tier whose model cannot serve a request that calls tools (`tools`) or asks
    /// for several choices (`choices` > 1), and why.
    pub fn unable_to_serve(&self, tools: bool, choices: u32) -> BTreeMap<String, String> {
        self.names()
            .into_iter()
            .filter_map(|tier| {
                let backend = self.backend(&tier, None)?;
                let why = unable_to_serve(backend.as_ref(), tools, choices)?;
                Some((tier, why))
            })
            .collect()
    }

    /// The tier to serve a request that `unservable` tiers cannot: `tier` itself if it
    /// can, else the nearest larger tier that can, else the nearest smaller one.
    pub fn nearest_able(
        &self,
        tier: &str,
        unservable: &BTreeMap<String, String>,
    ) -> Option<String> {
        let names = self.names();
        let position = names.iter().position(|t| t == tier).unwrap_or(0);
        let larger = names[position..].iter();
        let smaller = names[..position].iter().rev();
        larger
            .chain(smaller)
            .find(|t| !unservable.contains_key(*t))
            .cloned()
    }

    /// `tier` first, then each smaller tier (those listed before it), nearest first.
    pub fn degrade_path(&self, tier: &str) -> Vec<String> {
        // Borrowed names until the path is known: this runs for every request.
        let mut before: Vec<&str> = Vec::new();
        let mut found = false;
        for name in self.backends.iter().map(|b| b.info().tier.as_str()) {
            if name == tier {
                found = true;
                break;
            }
            if !before.contains(&name) {
                before.push(name);
            }
        }
        if !found {
            before.clear();
        }
        std::iter::once(tier)
            .chain(before.into_iter().rev())
            .map(str::to_owned)
            .collect()
    }

    /// `auto`, then every tier and model id, each once: what `model` may say.
    pub fn model_names(&self) -> Vec<String> {
        let mut names = vec!["auto".to_owned()];
        for backend in &self.backends {
            let info = backend.info();
            for name in [&info.tier, &info.id] {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// `Some` when text of `bytes` cannot fit any tier's context: every backend's fewest
    /// possible tokens for it (from its longest token) reach its context. Decided before
    /// any templating or tokenizing, so an oversized prompt costs nothing. Backends whose
    /// limits are not known yet (still loading) count as fitting.
    pub fn too_large(&self, bytes: usize) -> Option<TooLarge> {
        let mut largest_context = 0;
        let mut min_tokens = u64::MAX;
        for backend in &self.backends {
            let limits = backend.limits()?;
            let tokens = limits.min_tokens(bytes);
            if tokens < u64::from(limits.context) {
                return None;
            }
            largest_context = largest_context.max(limits.context);
            min_tokens = min_tokens.min(tokens);
        }
        (!self.backends.is_empty()).then_some(TooLarge {
            bytes,
            min_tokens,
            largest_context,
        })
    }

    pub fn all_ready(&self) -> bool {
        self.backends.iter().all(|b| b.is_ready())
    }

    /// One request's prompt-token counts, computed per tier on first use.
    pub fn counter<'a>(
        &'a self,
        messages: &'a [ChatMessage],
        pin: Option<&'a Pin>,
    ) -> PromptTokens<'a> {
        PromptTokens {
            tiers: self,
            messages,
            pin,
            counted: Mutex::new(Vec::new()),
        }
    }
}

/// A request's prompt-token counts on each tier's tokenizer, as its backend will prefill
/// them. Routing rules, the token quota and the TTFT prediction all ask, and a long prompt
/// costs real time to template and count, so each tier is counted once per request.
pub struct PromptTokens<'a> {
    tiers: &'a Tiers,
    messages: &'a [ChatMessage],
    /// A pinned model counts with its own tokenizer, which may differ from its tier's first.
    pin: Option<&'a Pin>,
    counted: Mutex<Vec<(String, Result<u32, String>)>>,
}

impl PromptTokens<'_> {
    /// Whether every count asked for so far succeeded (a tier still loading cannot count).
    pub fn all_counted(&self) -> bool {
        let counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        counted.iter().all(|(_, count)| count.is_ok())
    }
}

impl TokenCounter for PromptTokens<'_> {
    fn prompt_tokens(&self, tier: &str) -> Result<u32, String> {
        // Plain data behind the lock: a poisoned one is still consistent.
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, count)) = counted.iter().find(|(t, _)| t == tier) {
            return count.clone();
        }
        let model = self
            .pin
            .filter(|p| p.tier == tier)
            .and_then(|p| p.model.as_deref());
        let count = match self.tiers.backend(tier, model) {
            Some(backend) => backend
                .count_prompt_tokens(self.messages)
                .map_err(|e| e.to_string()),
            None => Err(format!("no model serves tier `{tier}`")),
        };
        counted.push((tier.to_owned(), count.clone()));
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scripted::ScriptedEngine;

    fn tiers() -> Tiers {
        Tiers::new(vec![
            ScriptedEngine::new("small-a", "fast").into_backend(),
            ScriptedEngine::new("small-b", "fast").into_backend(),
            ScriptedEngine::new("big", "full").into_backend(),
        ])
    }

    #[test]
    fn naming_the_second_model_of_a_shared_tier_serves_that_model() {
        let tiers = tiers();
        let pin = tiers.resolve("small-b").expect("known").expect("pinned");
        assert_eq!(pin.tier, "fast");
        let backend = tiers
            .backend(&pin.tier, pin.model.as_deref())
            .expect("a backend");
        assert_eq!(backend.info().id, "small-b");
    }

    #[test]
    fn a_tier_name_pins_the_tiers_first_model_and_auto_pins_nothing() {
        let tiers = tiers();
        let pin = tiers.resolve("fast").expect("known").expect("pinned");
        assert_eq!(pin.model, None);
        let backend = tiers.backend("fast", None).expect("a backend");
        assert_eq!(backend.info().id, "small-a");
        assert_eq!(tiers.resolve("auto"), Ok(None));
    }

    #[test]
    fn model_ids_win_over_tier_names() {
        let tiers = Tiers::new(vec![
            ScriptedEngine::new("fast", "full").into_backend(),
            ScriptedEngine::new("tiny", "fast").into_backend(),
        ]);
        let pin = tiers.resolve("fast").expect("known").expect("pinned");
        assert_eq!(pin.tier, "full");
        assert_eq!(pin.model.as_deref(), Some("fast"));
    }

    #[test]
    fn unknown_models_list_what_exists() {
        let err = tiers().resolve("gpt-4").expect_err("unknown");
        assert_eq!(
            err.available,
            ["auto", "fast", "small-a", "small-b", "full", "big"]
        );
    }

    #[test]
    fn a_prompt_is_too_large_only_when_it_fits_no_tier_by_its_bytes() {
        let small = ScriptedEngine::new("small", "fast");
        small.set_context(Some(100));
        let big = ScriptedEngine::new("big", "full");
        big.set_context(Some(1000));
        let tiers = Tiers::new(vec![small.into_backend(), big.into_backend()]);
        // 64 bytes per token at most: 64 000 bytes are at least 1000 tokens.
        assert_eq!(tiers.too_large(63_999), None);
        let too_large = tiers.too_large(64_000).expect("fits no tier");
        assert_eq!(too_large.largest_context, 1000);
        assert_eq!(too_large.min_tokens, 1000);
    }

    #[test]
    fn tiers_degrade_to_the_ones_listed_before_them() {
        let tiers = tiers();
        assert_eq!(tiers.degrade_path("full"), ["full", "fast"]);
        assert_eq!(tiers.degrade_path("fast"), ["fast"]);
        // Three tiers, one listed twice: each smaller tier once, nearest first.
        let tiers = Tiers::new(
            [("a", "tiny"), ("b", "fast"), ("c", "tiny"), ("d", "full")]
                .map(|(id, tier)| ScriptedEngine::new(id, tier).into_backend())
                .into(),
        );
        assert_eq!(tiers.degrade_path("full"), ["full", "fast", "tiny"]);
        assert_eq!(tiers.degrade_path("fast"), ["fast", "tiny"]);
        // A tier no backend serves degrades nowhere.
        assert_eq!(tiers.degrade_path("huge"), ["huge"]);
    }
}
