//! Structured outputs on a local model: a `response_format` schema compiled once into a
//! llama.cpp grammar, and a sampler that keeps every sampled token inside it.
//!
//! Sampling follows llama.cpp's own `common_sampler`: sample as if unconstrained, then ask
//! the grammar whether that one token is allowed. Only when it is not are the grammar's
//! rules run over the vocabulary and the token sampled again from what they allow.
//! Checking one candidate is cheap; masking 262k candidates (Gemma's vocabulary) is not,
//! and the model thread samples every sequence of a step in turn, so a constrained
//! sequence's cost is every other sequence's wait. So before the rules run, the grammar
//! is asked which bytes it takes next, and which characters after each ASCII one (with
//! single-byte tokens), and tokens whose text starts otherwise are left out: the grammar
//! would refuse them all, so the outcome is the same (see [`FirstBytes`]).

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

/// The first two bytes of each token's text, so that a refused pick runs the grammar's
/// rules only over tokens whose start the grammar can take next. Computed once per model.
///
/// The grammar is asked with single-byte tokens: which bytes it takes next, and, for
/// each ASCII character it takes, which ASCII characters it takes after it (on a copy
/// advanced by that character). One byte is not enough: JSON grammars allow a space almost
/// everywhere, and most of a vocabulary starts with one.
///
/// Leaving a token out is exact only where the grammar would refuse it anyway:
/// - llama.cpp decodes a token's text into code points and matches them in order, so a
///   token whose first ASCII character (or first two) it refuses is refused. Midway
///   through a multi-byte character it refuses a lone ASCII byte and any token starting
///   with one alike (both invalid UTF-8).
/// - For a byte of 0x80 or more, llama.cpp refuses the lone byte only when no character
///   it could start (or continue) matches a positive class, which then refuses any such
///   character. A negated class is the exception: it refuses the lone byte when any
///   character it could start is excluded (`[^€]` from a `pattern` refuses 0xE2), where a
///   whole token's character (`→`) may be allowed. So these bytes are judged only for
///   grammars whose negated classes list ASCII characters only ([`judges_lead_bytes`]),
///   as JSON's do; otherwise their tokens are always offered.
/// - llama.cpp refuses a token with empty text, or text starting with NUL, outright.
///
/// This holds for grammars made by `json_schema_to_grammar`, the only source here; GBNF's
/// token terminals (`<[id]>`) would match tokens by id, not by text. Overlong UTF-8
/// (`0xC1 0x81` for `A`) is read by llama.cpp as the character, though its lone lead byte
/// is refused; no vocabulary holds such tokens.
///
/// End-of-generation tokens and tokens whose text depends on how special tokens are
/// rendered are always offered to the grammar, and a character with no single-byte token
/// to ask about counts as allowed. `tests::first_bytes_leave_out_only_tokens_the_grammar_refuses`
/// checks the outcome against the whole vocabulary on both default models.
pub struct FirstBytes {
    /// Per token id: its text's first byte and its second (`END` for one-byte texts);
    /// `None` for tokens always offered.
    heads: Vec<Option<[u8; 2]>>,
    /// Per byte, a token whose whole text is that byte, if the vocabulary has one.
    probes: [Option<LlamaToken>; 256],
}

/// Bytes below this are ASCII characters.
const ASCII: u8 = 0x80;
/// The second byte of a one-byte text (NUL cannot be one: such tokens are always offered).
const END: u8 = 0;

/// Which bytes a grammar takes next.
type NextBytes = [bool; 256];

impl FirstBytes {
    pub fn of(model: &LlamaModel) -> Self {
        let vocab = model.vocab();
        let mut probes = [None; 256];
        let heads = model
            .tokens(true)
            .map(|(token, text)| {
                let plain = vocab.token_to_piece(token, false, None);
                if vocab.is_eog(token) || plain != text {
                    return None;
                }
                match text.as_slice() {
                    // llama.cpp refuses empty texts, and texts starting with NUL.
                    [] | [0, ..] => Some([0, END]),
                    [byte] => {
                        probes[usize::from(*byte)].get_or_insert(token);
                        Some([*byte, END])
                    }
                    [_, 0, ..] => None,
                    [byte, second, ..] => Some([*byte, *second]),
                }
            })
            .collect();
        Self { heads, probes }
    }

    /// Which bytes `rules`, in their current state, take as the next one.
    fn next_bytes(&self, rules: &mut LlamaSampler) -> NextBytes {
        // A byte with no token to ask with is allowed; NUL never is.
        let mut allowed = [true; 256];
        allowed[0] = false;
        let mut asked = LlamaTokenDataArray::new(
            self.probes
                .iter()
                .flatten()
                .map(|&token| LlamaTokenData::new(token, 0.0, 0.0))
                .collect(),
            false,
        );
        asked.apply_sampler(rules);
        for candidate in &asked.data {
            if let Some([byte, _]) = self.head(candidate.id()) {
                allowed[usize::from(byte)] = candidate.logit().is_finite();
            }
        }
        allowed
    }

    /// What `rules` take after the ASCII character `byte`; `None` when that cannot be
    /// asked (no token for it), so that every second byte counts as allowed.
    fn next_bytes_after(&self, rules: &LlamaSampler, byte: u8) -> Option<NextBytes> {
        let token = self.probes[usize::from(byte)]?;
        let mut advanced = rules.clone();
        advanced.try_accept(token).ok()?;
        Some(self.next_bytes(&mut advanced))
    }

    fn head(&self, token: LlamaToken) -> Option<[u8; 2]> {
        let id = usize::try_from(token.0).ok()?;
        *self.heads.get(id)?
    }

    /// The tokens at `logits` the grammar may allow, as sampling candidates.
    /// `judge_lead_bytes`: see [`judges_lead_bytes`].
    fn candidates(
        &self,
        rules: &mut LlamaSampler,
        logits: &[f32],
        judge_lead_bytes: bool,
    ) -> LlamaTokenDataArray {
        let first = self.next_bytes(rules);
        // What follows each allowed ASCII character, asked when a token first needs it.
        let mut second: [Option<Option<NextBytes>>; ASCII as usize] = [None; ASCII as usize];
        let data = logits
            .iter()
            .zip(&self.heads)
            .zip(0..)
            .filter(|&((_, head), _)| {
                let Some([byte, next]) = *head else {
                    return true;
                };
                if byte >= ASCII && !judge_lead_bytes {
                    return true;
                }
                if !first[usize::from(byte)] {
                    return false;
                }
                // Only two ASCII characters are judged together.
                if byte >= ASCII || next == END || next >= ASCII {
                    return true;
                }
                second[usize::from(byte)]
                    .get_or_insert_with(|| self.next_bytes_after(rules, byte))
                    .is_none_or(|after| after[usize::from(next)])
            })
            .map(|((&logit, _), id)| LlamaTokenData::new(LlamaToken(id), logit, 0.0))
            .collect();
        LlamaTokenDataArray::new(data, false)
    }
}

/// One sequence's sampler: the request's sampling chain, and the grammar its reply must
/// follow, if any.
pub struct SeqSampler {
    chain: LlamaSampler,
    grammar: Option<Constraint>,
    /// The chain keeps a history of accepted tokens (penalties): a pick the grammar
    /// refuses must not be recorded in it.
    chain_remembers: bool,
}

impl SeqSampler {
    /// `chain_remembers`: the chain has samplers whose state depends on the tokens it
    /// accepted (penalties).
    pub fn new(chain: LlamaSampler, grammar: Option<Constraint>, chain_remembers: bool) -> Self {
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
        let Some(mut constraint) = self.grammar.take() else {
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
        let rules = &mut constraint.rules;
        let (token, recorded) = match first {
            Some(token) if allows(rules, token) => (token, recorded),
            refused => (
                self.constrained_pick(ctx, index, &mut constraint, refused)?,
                false,
            ),
        };
        constraint.rules.try_accept(token).ok()?;
        if !recorded {
            self.chain.accept(token);
        }
        self.grammar = Some(constraint);
        Some(token)
    }

    /// The chain's pick among the tokens the grammar allows; `None` if it allows none.
    fn constrained_pick(
        &mut self,
        ctx: &LlamaContext<'_>,
        index: i32,
        constraint: &mut Constraint,
        refused: Option<LlamaToken>,
    ) -> Option<LlamaToken> {
        let rules = &mut constraint.rules;
        let mut offered = if constraint.narrows {
            constraint.first_bytes.candidates(
                rules,
                ctx.get_logits_ith(index),
                constraint.judges_lead_bytes,
            )
        } else {
            ctx.token_data_array_ith(index)
        };
        if constraint.draws_from_all && offered.data.len() > ASKED_AT_ONCE {
            if let Some(token) = self.redraw(rules, &mut offered, refused) {
                return Some(token);
            }
        }
        let mut allowed = match constraint.decided_by_top {
            Some(top) => highest_allowed(rules, &mut offered, top).unwrap_or(offered),
            None => offered,
        };
        allowed.apply_sampler(rules);
        if !allowed.data.iter().any(|c| c.logit().is_finite()) {
            return None;
        }
        allowed.apply_sampler(&mut self.chain);
        allowed
            .selected_token()
            .filter(|&token| allows(rules, token))
    }
}

impl SeqSampler {
    /// For a chain that draws from the whole distribution it is given: draws again from
    /// the offered tokens, without the refused ones, up to `REDRAWS` times. Exact: a draw
    /// from any set that holds every allowed token, kept when allowed, is distributed as a
    /// draw from the allowed tokens alone, however many draws were refused before it; so
    /// is the full mask this falls back to (`None`). Cheaper than the mask where most of
    /// the vocabulary is offered (inside strings), where a redraw is nearly always allowed.
    fn redraw(
        &mut self,
        rules: &mut LlamaSampler,
        offered: &mut LlamaTokenDataArray,
        mut refused: Option<LlamaToken>,
    ) -> Option<LlamaToken> {
        for _ in 0..REDRAWS {
            if let Some(token) = refused {
                // Offered tokens are in id order, most of them: look it up there first.
                let at = usize::try_from(token.0).ok().and_then(|id| {
                    offered
                        .data
                        .get(id)
                        .filter(|c| c.id() == token)
                        .map(|_| id)
                        .or_else(|| offered.data.iter().position(|c| c.id() == token))
                });
                if let Some(at) = at {
                    offered.data[at].set_logit(f32::NEG_INFINITY);
                }
            }
            // The chain scales logits in place: each draw is made on a copy.
            let mut draw = LlamaTokenDataArray::new(offered.data.clone(), false);
            draw.apply_sampler(&mut self.chain);
            let token = draw.selected_token()?;
            if allows(rules, token) {
                return Some(token);
            }
            refused = Some(token);
        }
        None
    }
}

/// Draws made again before a refused pick falls back to masking the offered tokens.
const REDRAWS: usize = 2;

/// A sequence's grammar: its rules in their current state, and the model's first bytes
/// for the refusal path.
pub struct Constraint {
    pub rules: LlamaSampler,
    pub first_bytes: Arc<FirstBytes>,
    /// `Some(k)` when the chain's pick depends only on the `k` highest logits it is given
    /// (greedy: 1; a top-k cut with no biases or penalties before it, which would change
    /// the order: k). The refusal path then needs the grammar's verdict on only as many
    /// of the highest offered tokens as it takes to find `k` it allows.
    pub decided_by_top: Option<usize>,
    /// The chain draws from the whole distribution it is given (no top-k or top-p cut,
    /// not greedy): a refused pick may be drawn again instead of masking.
    pub draws_from_all: bool,
    /// The grammar's verdict on a lone non-ASCII byte holds for every token starting with
    /// it ([`judges_lead_bytes`]).
    pub judges_lead_bytes: bool,
    /// Offer the grammar only the tokens `first_bytes` leaves. Off when the chain has more
    /// than a few logit biases: llama.cpp finds a bias's token by its index only in the
    /// whole vocabulary in id order, and compares every entry of any other array with each
    /// bias (on Gemma with 300 biases, the batch's step grew by 4.5-4.7 ms with the whole
    /// vocabulary and 5.7-8.5 ms narrowed, in a spread of about 5 ms).
    pub narrows: bool,
}

/// Logit biases up to which offering fewer tokens still costs less than the biases'
/// search through them.
pub const NARROWS_WITH_BIASES: usize = 8;

/// Offered tokens the grammar is asked about at a time, highest logits first.
const ASKED_AT_ONCE: usize = 256;

/// The `top` highest-logit tokens among `offered` that `rules` allow, found by asking
/// about the highest `ASKED_AT_ONCE` offered tokens; `None` (ask about all of them) when
/// fewer than `top` of those are allowed. Exact: any allowed token left out ranks below
/// `top` allowed ones. `offered` may be reordered.
fn highest_allowed(
    rules: &mut LlamaSampler,
    offered: &mut LlamaTokenDataArray,
    top: usize,
) -> Option<LlamaTokenDataArray> {
    if offered.data.len() <= ASKED_AT_ONCE.max(top) {
        return None;
    }
    // Ties go to the lower id, as greedy's scan of the vocabulary in id order does. (When
    // this finds too few, `offered` is left reordered, and ties among it go either way.)
    let by_logit_descending = |a: &LlamaTokenData, b: &LlamaTokenData| {
        b.logit()
            .total_cmp(&a.logit())
            .then_with(|| a.id().0.cmp(&b.id().0))
    };
    offered
        .data
        .select_nth_unstable_by(ASKED_AT_ONCE - 1, by_logit_descending);
    let mut highest = offered.data[..ASKED_AT_ONCE].to_vec();
    highest.sort_unstable_by(by_logit_descending);
    let mut asked = LlamaTokenDataArray::new(highest, true);
    asked.apply_sampler(rules);
    let allowed: Vec<LlamaTokenData> = asked
        .data
        .iter()
        .filter(|candidate| candidate.logit().is_finite())
        .take(top)
        .copied()
        .collect();
    (allowed.len() == top).then(|| LlamaTokenDataArray::new(allowed, true))
}

/// Whether the grammar's verdict on a lone byte of 0x80 or more holds for every token
/// starting with that byte: true when no negated character class in the GBNF text lists a
/// non-ASCII character (see [`FirstBytes`]). Conservative: an escape that may name one
/// (`\u`, `\U`, `\x80` and up) counts as one, and `[^` inside a string literal is read
/// as a class.
pub fn judges_lead_bytes(grammar: &str) -> bool {
    let text = grammar.as_bytes();
    grammar.match_indices("[^").all(|(start, _)| {
        let mut at = start + 2;
        loop {
            match text.get(at) {
                // Unterminated: cannot tell.
                None => return false,
                Some(b']') => return true,
                Some(b'\\') => {
                    match text.get(at + 1) {
                        Some(b'u' | b'U') => return false,
                        Some(b'x') if !matches!(text.get(at + 2), Some(b'0'..=b'7')) => {
                            return false
                        }
                        _ => {}
                    }
                    at += 2;
                }
                Some(&byte) if byte >= ASCII => return false,
                Some(_) => at += 1,
            }
        }
    })
}

/// Whether the grammar, in its current state, allows `token` next.
fn allows(grammar: &mut LlamaSampler, token: LlamaToken) -> bool {
    let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 1.0, 0.0)], false);
    one.apply_sampler(grammar);
    one.data
        .first()
        .is_some_and(|candidate| candidate.logit().is_finite())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use llama_cpp_2::model::params::LlamaModelParams;

    use super::*;

    const SCHEMA: &str = r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0},"city":{"enum":["Paris","東京","Zürich"]},"tags":{"type":"array","items":{"type":"string"}}},"required":["name","age","city","tags"]}"#;
    /// Valid under `SCHEMA`, with text that splits into partial UTF-8 tokens.
    const REPLY: &str = r#"{"name": "Zoë \"Ann\" 東京", "age": 31, "city": "Zürich", "tags": ["a\nb", "ÿ€😀", ""]}"#;
    /// Any JSON object (`json_object`), pretty-printed, with numbers, escapes and nesting.
    const ANY_OBJECT: &str = r#"{"type":"object"}"#;
    const ANY_REPLY: &str =
        "{\n  \"a\": [1, -2.5e3, true, null, {\"b\": \"\\u00e9\\t\"}],\n  \"ключ\": {}\n}";
    /// A negated class with a non-ASCII character: llama.cpp refuses the lone lead byte
    /// 0xE2 (it could start `€`), but takes whole characters that start with it.
    const NOT_EURO: &str = r#"{"type":"string","pattern":"^[^€]+$"}"#;
    const NOT_EURO_REPLY: &str = r#""a→b — c…""#;

    /// Token ids the rules allow among `candidates`.
    fn allowed(rules: &mut LlamaSampler, mut candidates: LlamaTokenDataArray) -> Vec<i32> {
        candidates.apply_sampler(rules);
        let mut ids: Vec<i32> = candidates
            .data
            .iter()
            .filter(|c| c.logit().is_finite())
            .map(|c| c.id().0)
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn lead_bytes_are_judged_only_without_non_ascii_negations() {
        for (grammar, judged) in [
            // JSON's string characters, as llama.cpp writes them.
            (r#"char ::= [^"\\\x7F\x00-\x1F] | [\\] ["\\/bfnrt]"#, true),
            (r#"root ::= [^a-z\]\-] "é""#, true),
            ("root ::= [^€]", false),
            (r"root ::= [^\u20AC]", false),
            (r"root ::= [^\U0001F600]", false),
            (r"root ::= [^\xE2]", false),
            (r"root ::= [^\x7F\xA0]", false),
            (r"root ::= [^\]é]", false),
            (r"root ::= [^a-\u00FF]", false),
            ("root ::= [^a", false),
            // Positive classes may list anything.
            (r"root ::= [€-\U0010FFFF]", true),
        ] {
            assert_eq!(judges_lead_bytes(grammar), judged, "{grammar}");
        }
    }

    /// At every position of a reply, the tokens the rules allow among the candidates the
    /// first bytes leave are exactly those they allow among the whole vocabulary; and, in
    /// JSON objects, the first bytes leave out all but 5% of it at a fifth of the positions
    /// or more.
    #[test]
    fn first_bytes_leave_out_only_tokens_the_grammar_refuses() {
        let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gguf");
        let backend = crate::engine::prompt::backend().expect("backend");
        let files = [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gemma-3-270m-q4_k_m.gguf",
        ];
        // (schema, reply, whether it is JSON's structure that the first bytes narrow)
        let cases = [
            (SCHEMA, REPLY, true),
            (ANY_OBJECT, ANY_REPLY, true),
            (NOT_EURO, NOT_EURO_REPLY, false),
        ];
        for (file, (schema, reply, narrows)) in files
            .into_iter()
            .flat_map(|file| cases.map(|case| (file, case)))
        {
            serde_json::from_str::<serde_json::Value>(reply).expect("the reply is JSON");
            let grammar = llama_cpp_2::json_schema_to_grammar(schema).expect("grammar");
            let judge_lead_bytes = judges_lead_bytes(&grammar);
            // JSON's own negated class (a string's characters) lists ASCII only.
            assert_eq!(judge_lead_bytes, narrows, "{schema}: {grammar}");
            let params = LlamaModelParams::default().with_vocab_only(true);
            let model = LlamaModel::load_from_file(backend, gguf.join(file), &params)
                .unwrap_or_else(|e| panic!("{file}: {e} (run `just models`)"));
            let first_bytes = FirstBytes::of(&model);
            let n_vocab = usize::try_from(model.n_vocab()).expect("vocabulary size");
            let logits = vec![0.0_f32; n_vocab];
            let mut rules = LlamaSampler::grammar(&model, &grammar, "root").expect("rules");
            let tokens = model.vocab().tokenize(reply.as_bytes(), false, false);
            let texts: Vec<Vec<u8>> = model.tokens(true).map(|(_, text)| text).collect();
            let lone_e2 = texts.iter().position(|text| text.as_slice() == [0xE2]);
            // Positions where a judge by lone lead bytes would drop allowed tokens.
            let mut lead_byte_misleads = 0;
            let (mut narrowed, mut positions, mut found_early) = (0, 0, 0);
            for &token in tokens.iter().chain(None) {
                let whole = LlamaTokenDataArray::from_iter(
                    (0..model.n_vocab()).map(|id| LlamaTokenData::new(LlamaToken(id), 0.0, 0.0)),
                    false,
                );
                let offered = first_bytes.candidates(&mut rules, &logits, judge_lead_bytes);
                if offered.data.len() * 20 < n_vocab {
                    narrowed += 1;
                }
                let allowed_in_whole = allowed(&mut rules, whole);
                let allowed_offered = allowed(&mut rules, offered);
                // Named by text, a few at most: the lists run to the whole vocabulary.
                let left_out: Vec<String> = allowed_in_whole
                    .iter()
                    .filter(|id| allowed_offered.binary_search(id).is_err())
                    .take(5)
                    .map(|&id| format!("{id} {:?}", String::from_utf8_lossy(&texts[id as usize])))
                    .collect();
                assert!(
                    left_out.is_empty() && allowed_offered.len() == allowed_in_whole.len(),
                    "{file}: position {positions}: {} allowed, {} offered and allowed; left out: {left_out:?}",
                    allowed_in_whole.len(),
                    allowed_offered.len()
                );
                let lone_refused =
                    lone_e2.is_some_and(|id| allowed_in_whole.binary_search(&(id as i32)).is_err());
                if lone_refused
                    && allowed_in_whole
                        .iter()
                        .any(|&id| texts[id as usize].first() == Some(&0xE2))
                {
                    lead_byte_misleads += 1;
                }
                // The highest allowed tokens, found from the highest offered, are those
                // of the whole vocabulary (distinct logits, shuffled per position).
                let n = model.n_vocab();
                let shuffled: Vec<f32> = (0..n)
                    .map(|id| {
                        let rank =
                            (i64::from(id) * 7919 + positions as i64 * 104_729) % i64::from(n);
                        rank as f32 / n as f32 * 20.0
                    })
                    .collect();
                for top in [1, 40] {
                    let whole = LlamaTokenDataArray::from_iter(
                        shuffled
                            .iter()
                            .zip(0..)
                            .map(|(&logit, id)| LlamaTokenData::new(LlamaToken(id), logit, 0.0)),
                        false,
                    );
                    let mut expected: Vec<(f32, i32)> = allowed(&mut rules, whole)
                        .into_iter()
                        .map(|id| (shuffled[id as usize], id))
                        .collect();
                    expected.sort_by(|a, b| b.0.total_cmp(&a.0));
                    let expected: Vec<i32> =
                        expected.into_iter().take(top).map(|(_, id)| id).collect();
                    let mut offered =
                        first_bytes.candidates(&mut rules, &shuffled, judge_lead_bytes);
                    if let Some(found) = highest_allowed(&mut rules, &mut offered, top) {
                        let found: Vec<i32> = found.data.iter().map(|c| c.id().0).collect();
                        assert_eq!(found, expected, "{file}: position {positions}, top {top}");
                        found_early += 1;
                    }
                }
                positions += 1;
                rules
                    .try_accept(token)
                    .unwrap_or_else(|e| panic!("{file}: {token:?}: {e}"));
            }
            // After the whole reply only end-of-generation is allowed.
            let whole = LlamaTokenDataArray::from_iter(
                (0..model.n_vocab()).map(|id| LlamaTokenData::new(LlamaToken(id), 0.0, 0.0)),
                false,
            );
            let offered = first_bytes.candidates(&mut rules, &logits, judge_lead_bytes);
            let at_end = allowed(&mut rules, whole);
            assert!(!at_end.is_empty(), "{file}: nothing allowed at the end");
            assert_eq!(allowed(&mut rules, offered), at_end, "{file}: at the end");
            assert!(
                found_early > 0,
                "{file}: the highest offered never held enough"
            );
            // Where only structure is allowed, little is offered; values, strings and
            // indentation allow much of the vocabulary.
            assert!(
                narrows || lead_byte_misleads > 0,
                "{file}: the lone lead byte 0xE2 was never refused where `→` was allowed"
            );
            assert!(
                !narrows || narrowed * 5 >= positions,
                "{file}: the first bytes narrowed only {narrowed} of {positions} positions"
            );
        }
    }
}
