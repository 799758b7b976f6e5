//! Structured outputs on a local model: a `response_format` schema compiled once into a
//! llama.cpp grammar, and a sampler that keeps every sampled token inside it.
//!
//! Sampling follows llama.cpp's own `common_sampler`: sample as if unconstrained, then ask
//! the grammar whether that one token is allowed. Only when it is not are the grammar's
//! rules run over the whole vocabulary and the token sampled again from what they allow.
//! Checking one candidate is cheap; masking 262k candidates (Gemma's vocabulary) is not,
//! and the model thread samples every sequence of a step in turn, so a constrained
//! sequence's cost is every other sequence's wait.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use lru::LruCache;

use crate::chat::ReplyFormat;

/// Distinct schemas whose grammars are kept (a grammar is a few KiB of text).
const KEPT_GRAMMARS: usize = 256;

/// GBNF grammar text, shared by every request with the same schema.
pub type Grammar = Arc<str>;

/// Schemas compiled to grammars, each once: a schema's outcome (its grammar, or why it
/// has none) is kept, so a client that repeats a broken schema gets the same 400 without
/// another compile.
pub struct Grammars {
    compiled: Mutex<LruCache<Arc<str>, Result<Grammar, String>>>,
    compiles: AtomicU64,
}

impl Default for Grammars {
    fn default() -> Self {
        Self {
            compiled: Mutex::new(LruCache::new(
                NonZeroUsize::new(KEPT_GRAMMARS).unwrap_or(NonZeroUsize::MIN),
            )),
            compiles: AtomicU64::new(0),
        }
    }
}

impl Grammars {
    /// The grammar that enforces `format` on `model`; `None` for free text. `Err` says
    /// why the schema cannot be enforced (the caller answers 400 naming `response_format`).
    pub fn for_format(
        &self,
        format: &ReplyFormat,
        model: &LlamaModel,
    ) -> Result<Option<Grammar>, String> {
        let Some(schema) = format.schema() else {
            return Ok(None);
        };
        if let Some(known) = self.lock().get(schema) {
            return known.clone().map(Some);
        }
        // Compiled outside the lock: a large schema takes milliseconds. Two requests with a
        // new schema at once may both compile it; both get the same result.
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let outcome = compile(schema, model);
        self.lock().put(schema.into(), outcome.clone());
        outcome.map(Some)
    }

    /// How many schemas were compiled (each distinct schema once while it is kept).
    pub fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Arc<str>, Result<Grammar, String>>> {
        // A panic while holding the lock leaves the map whole: every write is one `put`.
        self.compiled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn compile(schema: &str, model: &LlamaModel) -> Result<Grammar, String> {
    // llama.cpp's converter throws on what it cannot express and the binding keeps only
    // a status code, so the message names the usual causes.
    let grammar = llama_cpp_2::json_schema_to_grammar(schema).map_err(|_| {
        "llama.cpp cannot turn this JSON Schema into a grammar (an unresolvable `$ref`, or a \
         keyword or `pattern` it does not support)"
            .to_owned()
    })?;
    // Parsed once here, on the caller's thread, so that a grammar llama.cpp will not load
    // is refused before the request is queued rather than failing its stream later.
    LlamaSampler::grammar(model, &grammar, "root")
        .map_err(|e| format!("the grammar made from this schema does not load: {e}"))?;
    Ok(grammar.into())
}

/// One sequence's sampler: the request's sampling chain, and the grammar its reply must
/// follow, if any.
pub struct SeqSampler {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
    /// The chain keeps a history of accepted tokens (penalties): a pick the grammar
    /// refuses must not be recorded in it.
    chain_remembers: bool,
}

impl SeqSampler {
    /// `chain_remembers`: the chain has samplers whose state depends on the tokens it
    /// accepted (penalties).
    pub fn new(chain: LlamaSampler, grammar: Option<LlamaSampler>, chain_remembers: bool) -> Self {
        Self {
            chain,
            grammar,
            chain_remembers,
        }
    }

    /// Samples the token at batch index `index` and records it in the sampler's state
    /// (penalties' history, the grammar's position). `None` when the grammar allows no
    /// token at all: the sequence must end there (llama.cpp aborts the process if a
    /// grammar is made to accept what it does not allow, so nothing is forced).
    pub fn sample(&mut self, ctx: &LlamaContext<'_>, index: i32) -> Option<LlamaToken> {
        let Some(mut grammar) = self.grammar.take() else {
            // llama.cpp samples and accepts in one call.
            return Some(self.chain.sample(ctx, index));
        };
        // The first pick is the chain's as if unconstrained. Without a history in the
        // chain, llama.cpp's own call makes it (and records it) without copying the logits
        // out, and recording a refused pick changes nothing. With one (penalties), it is
        // made from a copy, so that a refused pick never enters the history.
        let (first, recorded) = if self.chain_remembers {
            let mut candidates = ctx.token_data_array_ith(index);
            candidates.apply_sampler(&mut self.chain);
            (candidates.selected_token(), false)
        } else {
            (Some(self.chain.sample(ctx, index)), true)
        };
        // Most picks in a JSON reply are allowed; only a refused one masks the vocabulary.
        let (token, recorded) = match first.filter(|&token| allows(&mut grammar, token)) {
            Some(token) => (token, recorded),
            None => (self.constrained_pick(ctx, index, &mut grammar)?, false),
        };
        grammar.try_accept(token).ok()?;
        if !recorded {
            self.chain.accept(token);
        }
        self.grammar = Some(grammar);
        Some(token)
    }

    /// The chain's pick among the tokens the grammar allows; `None` if it allows none.
    fn constrained_pick(
        &mut self,
        ctx: &LlamaContext<'_>,
        index: i32,
        grammar: &mut LlamaSampler,
    ) -> Option<LlamaToken> {
        let mut allowed = ctx.token_data_array_ith(index);
        allowed.apply_sampler(grammar);
        if !allowed.data.iter().any(|c| c.logit().is_finite()) {
            return None;
        }
        allowed.apply_sampler(&mut self.chain);
        allowed
            .selected_token()
            .filter(|&token| allows(grammar, token))
    }
}

/// Whether the grammar, in its current state, allows `token` next.
fn allows(grammar: &mut LlamaSampler, token: LlamaToken) -> bool {
    let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 1.0, 0.0)], false);
    one.apply_sampler(grammar);
    one.data
        .first()
        .is_some_and(|candidate| candidate.logit().is_finite())
}
