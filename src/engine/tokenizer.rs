//! Exact prompt-token counts in microseconds: llama.cpp's tokenization of a GGUF
//! vocabulary, redone in Rust for the router, which must count every request's prompt
//! before it picks a tier. llama.cpp's own call costs 1.5–2 µs per token on this CPU.
//!
//! llama.cpp tokenizes in three steps, and so does this, rule for rule:
//! 1. cut the text around special tokens: control tokens (the chat template's markers)
//!    and user-defined ones (Gemma's runs of newlines, spaces and tabs, HTML tags);
//! 2. cut each plain piece into words: GPT-2's pre-tokenizer rules for BPE vocabularies,
//!    and for SentencePiece vocabularies at every space that no token in the vocabulary
//!    spans (so the merges inside a word are the merges inside the whole text);
//! 3. merge each word's symbols pair by pair, by the pair's merge rank (BPE: the
//!    `tokenizers` crate's BPE model) or by the merged token's score, leftmost first on
//!    ties (SentencePiece: [`spm_merge`]; a BPE model's fixed per-pair ranks cannot say
//!    "equal score, leftmost wins", which runs like `----` depend on).
//!
//! Words repeat, so the number of tokens per word is cached. Only the tokenizer types
//! whose rules are mirrored here are built; for others [`GgufTokenizer::from_gguf`] says
//! why not and callers keep llama.cpp's tokenizer. Every instance is also checked
//! token for token against llama.cpp when a model loads (`Prompter`).
//!
//! Details that decide exactness:
//! - special tokens are matched leftmost-longest (aho-corasick); a vocabulary where that
//!   could cut differently from llama.cpp's longest-first scan (a special token whose end
//!   overlaps another's start, unless both are runs of one character) is refused;
//! - BPE pre-tokenizers mirrored: `smollm`, `starcoder`, `refact`, `gpt-2` (digits are cut
//!   off one by one first, as llama.cpp does);
//! - the word cache holds 64 Ki words; words over 128 bytes are merged every time.
//!
//! Why not a `tokenizers::Tokenizer` built from the GGUF: on a 540-token prompt it took
//! 559 µs p50 for SmolLM2 (449 µs of it in the ByteLevel pre-tokenizer's regex) and
//! 487 µs for Gemma, five times the router's budget; and its BPE model ranks each merge
//! pair on its own, so it cannot express SentencePiece's "equal score, leftmost first".
//!
//! How it is kept honest:
//! - at load, the probe text (prose, contractions, digits, code, whitespace and
//!   punctuation runs, a dozen scripts, emoji sequences, `▁`, `<0x41>`, template markers)
//!   must give llama.cpp's ids one for one, alone and inside the chat template; on any
//!   difference the router counts with llama.cpp instead (exact, slower) and
//!   `tiergate check` says so;
//! - the engine still prefills llama.cpp's tokens and compares their number with this
//!   count on every request: `tiergate_prompt_token_count_mismatches_total` (expected 0);
//! - `tests/tokenizer.rs` compares ids on 3,000 seeded random texts per vocabulary and on
//!   templated documents; reversing the tie rule or dropping the digit split fails it.

use std::collections::{BinaryHeap, HashMap};
use std::io::{BufReader, Read};
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use quick_cache::sync::Cache;
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::Model;
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// Distinct words whose token counts are kept.
const WORD_CACHE_ENTRIES: usize = 65_536;
/// Longer words (base64, minified code) are merged every time rather than cached.
const MAX_CACHED_WORD_BYTES: usize = 128;

// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's visible space.
const SPM_SPACE: char = '\u{2581}';

pub struct GgufTokenizer {
    /// Special tokens matched in the raw text, longest first where they start together.
    specials: AhoCorasick,
    special_ids: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    words: WordModel,
    word_counts: Cache<String, u32>,
}

enum Piece<'a> {
    Word(&'a str),
    Token(u32),
}

enum WordModel {
    /// Byte-level BPE with GPT-2's word rules (llama.cpp's `gpt-2`, and with single
    /// digits split off first, `smollm`, `starcoder`, `refact`).
    Gpt2 {
        bpe: Box<BPE>,
        split_digits: bool,
    },
    Spm(Spm),
}

struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// `<0xXX>` tokens for bytes no token covers.
    byte_ids: Box<[Option<u32>; 256]>,
    unknown: u32,
    add_space_prefix: bool,
    /// Tokens with a space after another character (Gemma has one, `>▁</`): no word
    /// boundary is placed where one of them occurs in the text.
    spanning: Option<AhoCorasick>,
}

impl GgufTokenizer {
    /// Reads the vocabulary from the GGUF file's metadata (no weights).
    pub fn from_gguf(path: &Path) -> Result<Self, String> {
        let gguf = read_metadata(path)?;
        let meta = gguf.metadata();
        let text = |key: &str| meta.get(key).and_then(Value::as_str);
        let flag = |key: &str| meta.get(key).and_then(Value::as_bool);
        let id = |key: &str| meta.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let tokens = string_array(meta, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = number_array(meta, "tokenizer.ggml.token_type")?
            .into_iter()
            .map(|t| t as i64)
            .collect();
        if types.len() != tokens.len() {
            return Err("token_type and tokens differ in length".into());
        }

        let (words, add_bos_default) = match text("tokenizer.ggml.model").unwrap_or_default() {
            "gpt2" => {
                let split_digits = match text("tokenizer.ggml.pre").unwrap_or_default() {
                    "smollm" | "starcoder" | "refact" => true,
                    "gpt-2" => false,
                    other => return Err(format!("BPE pre-tokenizer `{other}` is not mirrored")),
                };
                (
                    WordModel::Gpt2 {
                        bpe: Box::new(gpt2_bpe(&tokens, meta)?),
                        split_digits,
                    },
                    false,
                )
            }
            "llama" => {
                let scores = number_array(meta, "tokenizer.ggml.scores")?;
                let spm = Spm::new(
                    &tokens,
                    scores.into_iter().map(|s| s as f32).collect(),
                    id("tokenizer.ggml.unknown_token_id").unwrap_or(0),
                    flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                )?;
                (WordModel::Spm(spm), true)
            }
            other => return Err(format!("tokenizer model `{other}` is not mirrored")),
        };

        let special_ids: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED
                )
            })
            .collect();
        let special_texts: Vec<&str> = special_ids
            .iter()
            .map(|&i| tokens[i as usize].as_str())
            .collect();
        check_specials_do_not_overlap(&special_texts)?;
        let specials = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&special_texts)
            .map_err(|e| e.to_string())?;

        let bos = flag("tokenizer.ggml.add_bos_token")
            .unwrap_or(add_bos_default)
            .then(|| id("tokenizer.ggml.bos_token_id"))
            .flatten();
        let eos = flag("tokenizer.ggml.add_eos_token")
            .unwrap_or(false)
            .then(|| id("tokenizer.ggml.eos_token_id"))
            .flatten();
        Ok(Self {
            specials,
            special_ids,
            bos,
            eos,
            words,
            word_counts: Cache::new(WORD_CACHE_ENTRIES),
        })
    }

    /// Token ids for `text` as llama.cpp gives them with `add_special` and `parse_special`
    /// both true. For checks; the router calls [`count`](Self::count).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.walk(text, &mut |piece| match piece {
            Piece::Word(word) => ids.extend(self.word_ids(word)),
            Piece::Token(id) => ids.push(id),
        });
        ids
    }

    /// `tokenize(text).len()`, with the tokens of each word cached.
    pub fn count(&self, text: &str) -> u32 {
        let mut count = 0u32;
        self.walk(text, &mut |piece| match piece {
            Piece::Word(word) => count += self.word_count(word),
            Piece::Token(_) => count += 1,
        });
        count
    }

    /// The text's words and its directly placed tokens (BOS, EOS, special tokens), in order.
    fn walk(&self, text: &str, on_piece: &mut dyn FnMut(Piece)) {
        if let Some(bos) = self.bos {
            on_piece(Piece::Token(bos));
        }
        let mut plain_start = 0;
        let mut escaped = String::new();
        let mut plain = |piece: &str, on_piece: &mut dyn FnMut(Piece)| {
            let on_word = &mut |word: &str| on_piece(Piece::Word(word));
            match &self.words {
                WordModel::Gpt2 { split_digits, .. } => {
                    gpt2_words(piece, *split_digits, on_word);
                }
                WordModel::Spm(spm) => {
                    escaped.clear();
                    // llama.cpp prefixes the space to plain text that starts the text or
                    // follows a special token: every plain piece, as two never touch.
                    if spm.add_space_prefix {
                        escaped.push(SPM_SPACE);
                    }
                    escaped.extend(piece.chars().map(|c| if c == ' ' { SPM_SPACE } else { c }));
                    spm.words(&escaped, on_word);
                }
            }
        };
        for found in self.specials.find_iter(text) {
            if found.start() > plain_start {
                plain(&text[plain_start..found.start()], on_piece);
            }
            on_piece(Piece::Token(self.special_ids[found.pattern().as_usize()]));
            plain_start = found.end();
        }
        if plain_start < text.len() {
            plain(&text[plain_start..], on_piece);
        }
        if let Some(eos) = self.eos {
            on_piece(Piece::Token(eos));
        }
    }

    /// Forgets every cached word count, so a benchmark can time the cold path.
    pub fn clear_word_cache(&self) {
        self.word_counts.clear();
    }

    fn word_ids(&self, word: &str) -> Vec<u32> {
        match &self.words {
            WordModel::Gpt2 { bpe, .. } => bpe
                .tokenize(&byte_level(word))
                .map(|tokens| tokens.iter().map(|t| t.id).collect())
                // Without an unknown token the model cannot fail: a character with no
                // token is dropped, as llama.cpp drops it.
                .unwrap_or_default(),
            WordModel::Spm(spm) => spm.merge(word),
        }
    }

    fn word_count(&self, word: &str) -> u32 {
        if word.len() > MAX_CACHED_WORD_BYTES {
            return self.word_ids(word).len() as u32;
        }
        if let Some(count) = self.word_counts.get(word) {
            return count;
        }
        let count = self.word_ids(word).len() as u32;
        self.word_counts.insert(word.to_owned(), count);
        count
    }
}

fn read_metadata(path: &Path) -> Result<gguf_rs::GGUFModel, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if &magic != b"GGUF" {
        return Err(format!(
            "{} is not a little-endian GGUF file",
            path.display()
        ));
    }
    // Buffered: the reader takes every field with its own small read.
    let mut container = gguf_rs::GGUFContainer::new(
        gguf_rs::ByteOrder::LE,
        Box::new(BufReader::new(file)),
        u64::MAX,
    );
    container
        .decode()
        .map_err(|e| format!("{}: {e}", path.display()))
}

type Metadata = std::collections::BTreeMap<String, Value>;

/// The array `key`, each element converted by `item`.
fn array<T>(
    meta: &Metadata,
    key: &str,
    item: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, String> {
    meta.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{key} is missing"))?
        .iter()
        .map(|v| item(v).ok_or_else(|| format!("{key}: unexpected element {v}")))
        .collect()
}

fn string_array(meta: &Metadata, key: &str) -> Result<Vec<String>, String> {
    array(meta, key, |v| v.as_str().map(str::to_owned))
}

fn number_array(meta: &Metadata, key: &str) -> Result<Vec<f64>, String> {
    array(meta, key, Value::as_f64)
}

/// Leftmost-longest matching cuts the text as llama.cpp's longest-token-first scan does
/// as long as no special token ends with the start of another. The one overlap allowed is
/// between runs of the same character (`\n\n`, `   `), where both scans cut the same.
/// Refuse vocabularies where they could differ.
fn check_specials_do_not_overlap(specials: &[&str]) -> Result<(), String> {
    let run_of_one = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|first| chars.all(|c| c == first))
    };
    // Each proper prefix, and whether every special that starts with it is a run.
    let mut prefixes: HashMap<&str, bool> = HashMap::new();
    for special in specials {
        let run = run_of_one(special);
        for (i, _) in special.char_indices().skip(1) {
            let only_runs = prefixes.entry(&special[..i]).or_insert(true);
            *only_runs &= run;
        }
    }
    for special in specials {
        let run = run_of_one(special);
        for (i, _) in special.char_indices().skip(1) {
            // A run's suffix is a run of the same character, so a run it overlaps is too.
            let overlaps = prefixes
                .get(&special[i..])
                .is_some_and(|&only_runs| !(run && only_runs));
            if overlaps {
                return Err(format!(
                    "special token {special:?} overlaps another special token"
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// GPT-2 byte-level BPE

fn gpt2_bpe(tokens: &[String], meta: &Metadata) -> Result<BPE, String> {
    let merges = string_array(meta, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(l, r)| (l.to_owned(), r.to_owned()))
                .ok_or_else(|| format!("merge {merge:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        // Words are counted once and cached here; the model's own cache would copy them again.
        .cache_capacity(0)
        .build()
        .map_err(|e| e.to_string())
}

/// GPT-2's printable stand-ins for bytes, as the vocabulary spells them.
fn byte_level(text: impl AsRef<[u8]>) -> String {
    text.as_ref()
        .iter()
        .map(|&b| BYTE_CHARS[b as usize])
        .collect()
}

static BYTE_CHARS: std::sync::LazyLock<[char; 256]> = std::sync::LazyLock::new(|| {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    chars
});

#[derive(Clone, Copy, PartialEq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> CharClass {
    // Most text is ASCII; the Unicode tables are a binary search.
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => CharClass::Letter,
            '0'..='9' => CharClass::Number,
            '\t' | '\n' | '\x0b' | '\x0c' | '\r' | ' ' => CharClass::Space,
            _ => CharClass::Other,
        };
    }
    // llama.cpp's `\s` is Unicode's White_Space, as is `char::is_whitespace`.
    if c.is_whitespace() {
        return CharClass::Space;
    }
    match c.general_category_group() {
        GeneralCategoryGroup::Letter => CharClass::Letter,
        GeneralCategoryGroup::Number => CharClass::Number,
        _ => CharClass::Other,
    }
}

/// GPT-2's pre-tokenizer as llama.cpp hand-codes it (`unicode_regex_split_custom_gpt2`):
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// after cutting off every `\p{N}` character on its own when `split_digits`.
fn gpt2_words(text: &str, split_digits: bool, on_word: &mut dyn FnMut(&str)) {
    if !split_digits {
        return gpt2_fragment(text, on_word);
    }
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if class(c) == CharClass::Number {
            gpt2_fragment(&text[start..i], on_word);
            on_word(&text[i..i + c.len_utf8()]);
            start = i + c.len_utf8();
        }
    }
    gpt2_fragment(&text[start..], on_word);
}

fn gpt2_fragment(text: &str, on_word: &mut dyn FnMut(&str)) {
    let chars: Vec<(usize, char, CharClass)> =
        text.char_indices().map(|(i, c)| (i, c, class(c))).collect();
    let byte_at = |pos: usize| chars.get(pos).map_or(text.len(), |&(i, _, _)| i);
    let class_at = |pos: usize| chars.get(pos).map(|&(_, _, class)| class);
    let char_at = |pos: usize| chars.get(pos).map(|&(_, c, _)| c);
    let mut pos = 0;
    let mut emit = |from: usize, to: usize| {
        if to > from {
            on_word(&text[byte_at(from)..byte_at(to)]);
        }
    };
    while pos < chars.len() {
        let (_, c, c_class) = chars[pos];
        if c == '\'' {
            let contraction = match (char_at(pos + 1), char_at(pos + 2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => 2,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
                _ => 0,
            };
            if contraction > 0 {
                emit(pos, pos + contraction);
                pos += contraction;
                continue;
            }
        }
        let lead = usize::from(c == ' ');
        let kind = if c == ' ' {
            class_at(pos + 1)
        } else {
            Some(c_class)
        };
        match kind {
            Some(kind @ (CharClass::Letter | CharClass::Number | CharClass::Other)) => {
                let mut end = pos + lead;
                while class_at(end) == Some(kind) {
                    end += 1;
                }
                emit(pos, end);
                pos = end;
            }
            _ => {
                let mut end = pos;
                while class_at(end) == Some(CharClass::Space) {
                    end += 1;
                }
                // `\s+(?!\S)`: a run followed by a non-space leaves its last space to
                // the next word.
                if end - pos > 1 && end < chars.len() {
                    end -= 1;
                }
                let end = end.max(pos + 1);
                emit(pos, end);
                pos = end;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SentencePiece (llama.cpp's `llm_tokenizer_spm`)

impl Spm {
    fn new(
        tokens: &[String],
        scores: Vec<f32>,
        unknown: u32,
        add_space_prefix: bool,
    ) -> Result<Self, String> {
        if scores.len() != tokens.len() {
            return Err("scores and tokens differ in length".into());
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            // llama.cpp keeps the first id of a duplicated text.
            ids.entry(token.clone()).or_insert(i as u32);
        }
        let mut byte_ids = Box::new([None; 256]);
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let spanning: Vec<&str> = tokens
            .iter()
            .map(String::as_str)
            .filter(|t| {
                t.char_indices()
                    .zip(t.chars().skip(1))
                    .any(|((_, a), b)| a != SPM_SPACE && b == SPM_SPACE)
            })
            .collect();
        let spanning = (!spanning.is_empty())
            .then(|| AhoCorasick::new(&spanning).map_err(|e| e.to_string()))
            .transpose()?;
        Ok(Self {
            ids,
            scores,
            byte_ids,
            unknown,
            add_space_prefix,
            spanning,
        })
    }

    /// Cuts escaped text before each run of `▁` that follows another character, unless a
    /// token that spans such a place occurs there.
    fn words(&self, text: &str, on_word: &mut dyn FnMut(&str)) {
        // Occurrences of spanning tokens, by start. A place is inside one when the
        // furthest end among those starting before it lies beyond it.
        let mut spans: Vec<(usize, usize)> = self.spanning.as_ref().map_or_else(Vec::new, |ac| {
            ac.find_overlapping_iter(text)
                .map(|m| (m.start(), m.end()))
                .collect()
        });
        spans.sort_unstable();
        let mut next_span = 0;
        let mut covered_to = 0;
        let mut start = 0;
        let mut prev: Option<char> = None;
        for (i, c) in text.char_indices() {
            while next_span < spans.len() && spans[next_span].0 < i {
                covered_to = covered_to.max(spans[next_span].1);
                next_span += 1;
            }
            let boundary =
                c == SPM_SPACE && prev.is_some_and(|p| p != SPM_SPACE) && covered_to <= i;
            if boundary {
                on_word(&text[start..i]);
                start = i;
            }
            prev = Some(c);
        }
        if start < text.len() {
            on_word(&text[start..]);
        }
    }

    fn merge(&self, word: &str) -> Vec<u32> {
        let pieces = spm_merge(word, |piece| {
            self.ids.get(piece).map(|&id| self.scores[id as usize])
        });
        let mut ids = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match self.ids.get(piece) {
                Some(&id) => ids.push(id),
                None => ids.extend(
                    piece
                        .bytes()
                        .map(|b| self.byte_ids[b as usize].unwrap_or(self.unknown)),
                ),
            }
        }
        ids
    }
}

/// SentencePiece's BPE: start from characters, and repeatedly merge the adjacent pair
/// whose joined text is the best-scoring token (leftmost on a tie) until no joined pair
/// is a token. Returns the final pieces in order.
fn spm_merge(word: &str, score: impl Fn(&str) -> Option<f32>) -> Vec<&str> {
    struct Symbol {
        start: usize,
        len: usize,
        prev: Option<usize>,
        next: Option<usize>,
    }
    #[derive(PartialEq)]
    struct Candidate {
        score: f32,
        left: usize,
        right: usize,
        len: usize,
    }
    impl Eq for Candidate {}
    impl Ord for Candidate {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            // Max-heap: the higher score first, then the leftmost.
            self.score
                .total_cmp(&other.score)
                .then(other.left.cmp(&self.left))
        }
    }
    impl PartialOrd for Candidate {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    let mut symbols: Vec<Symbol> = word
        .char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: Some(i + 1),
        })
        .collect();
    if let Some(last) = symbols.last_mut() {
        last.next = None;
    }
    let mut queue = BinaryHeap::new();
    let try_pair = |symbols: &[Symbol],
                    queue: &mut BinaryHeap<Candidate>,
                    left: Option<usize>,
                    right: Option<usize>| {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (&symbols[left], &symbols[right]);
        let joined = &word[l.start..l.start + l.len + r.len];
        if let Some(score) = score(joined) {
            queue.push(Candidate {
                score,
                left,
                right,
                len: joined.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_pair(&symbols, &mut queue, Some(i - 1), Some(i));
    }
    while let Some(best) = queue.pop() {
        let (left, right) = (best.left, best.right);
        // Stale: one side has merged with something else since this pair was queued.
        if symbols[left].len == 0
            || symbols[right].len == 0
            || symbols[left].len + symbols[right].len != best.len
        {
            continue;
        }
        symbols[left].len += symbols[right].len;
        symbols[right].len = 0;
        symbols[left].next = symbols[right].next;
        if let Some(next) = symbols[right].next {
            symbols[next].prev = Some(left);
        }
        try_pair(&symbols, &mut queue, symbols[left].prev, Some(left));
        try_pair(&symbols, &mut queue, Some(left), symbols[left].next);
    }
    let mut pieces = Vec::new();
    let mut at = (!symbols.is_empty()).then_some(0);
    while let Some(i) = at {
        pieces.push(&word[symbols[i].start..symbols[i].start + symbols[i].len]);
        at = symbols[i].next;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str, split_digits: bool) -> Vec<String> {
        let mut out = Vec::new();
        gpt2_words(text, split_digits, &mut |w| out.push(w.to_owned()));
        out
    }

    #[test]
    fn gpt2_words_follow_the_regex() {
        assert_eq!(
            words("Hello world's  end\n\nx", false),
            ["Hello", " world", "'s", " ", " end", "\n", "\n", "x"]
        );
        assert_eq!(words("a   ", false), ["a", "   "]);
        assert_eq!(words("ab 123 !!", false), ["ab", " 123", " !!"]);
        assert_eq!(words("ab 123", true), ["ab", " ", "1", "2", "3"]);
        assert_eq!(words("it'll 'x", false), ["it", "'ll", " '", "x"]);
    }

    #[test]
    fn spm_merges_leftmost_on_equal_scores() {
        // [a][a][a][a]: the three "aa" pairs tie, the leftmost merges, then "aaa" beats
        // "aa": [aaa][a]. Taking the rightmost first would end as [a][aaa].
        let score = |piece: &str| match piece {
            "aa" => Some(-1.0),
            "aaa" => Some(-0.5),
            _ => None,
        };
        assert_eq!(spm_merge("aaaa", score), ["aaa", "a"]);
        assert_eq!(spm_merge("", score), Vec::<&str>::new());
    }

    #[test]
    fn spm_words_break_before_spaces_except_inside_spanning_tokens() {
        let tokens: Vec<String> = ["<unk>", "▁a", ">▁</", "▁"].map(String::from).to_vec();
        let spm = Spm::new(&tokens, vec![0.0; 4], 0, false).expect("vocabulary");
        let mut words = Vec::new();
        spm.words("a>▁</b▁▁c▁d>▁</", &mut |w| {
            words.push(w.to_owned())
        });
        assert_eq!(words, ["a>▁</b", "▁▁c", "▁d>▁</"]);
    }

    #[test]
    fn overlapping_specials_are_refused() {
        assert!(check_specials_do_not_overlap(&["<a>", "\n\n", "\n", "   "]).is_ok());
        assert!(check_specials_do_not_overlap(&["ab", "bcd"]).is_err());
        // A tag ending in a newline overlaps a run of newlines.
        assert!(check_specials_do_not_overlap(&["<x>\n", "\n\n"]).is_err());
        assert!(check_specials_do_not_overlap(&["\n\n", "\n<x>"]).is_err());
    }

    #[test]
    fn byte_level_maps_bytes_like_gpt2() {
        assert_eq!(byte_level(" a\n"), "\u{120}a\u{10a}");
    }
}
