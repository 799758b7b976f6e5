//! What the router knows about a request: cheap text features computed on the request's
//! own task (never on a model thread), plus who sent it.
//!
//! Detectors are deliberately simple and explainable (counts of fences, syntax lines,
//! terms) so that an operator reading `tiergate route --explain` can see why a prompt was
//! called "code" and write a rule around it. Prompt token counts are not here: they depend
//! on the tier, so the policy asks a [`super::TokenCounter`] for them lazily.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::Regex;
use serde::Serialize;
use unicode_script::{Script, UnicodeScript};

use super::examples::Similar;
use crate::chat::{ChatMessage, Role};

/// Who is asking, from the request's headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub api_key: Option<String>,
    pub tenant: Option<String>,
    /// The routing hint header's value, lower-cased.
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Features {
    /// User messages in the conversation.
    pub turns: u32,
    pub system_prompt: bool,
    pub system_prompt_chars: u32,
    /// The request's `max_tokens`, if it set one.
    pub requested_max_tokens: Option<u32>,
    pub last_user_chars: u32,
    pub code: bool,
    pub code_fences: u32,
    pub code_syntax_lines: u32,
    pub code_terms: u32,
    pub math: bool,
    pub math_terms: u32,
    pub math_symbols: u32,
    pub math_expressions: u32,
    pub reasoning: bool,
    pub reasoning_cues: u32,
    /// Dominant writing system of the last user message (`latin`, `cjk`, `cyrillic`, ...).
    pub script: &'static str,
    /// Never shown: an explanation says only that a key was sent.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redacted")]
    pub api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The last user message as sent, for regex rules.
    #[serde(skip)]
    pub last_user: String,
    /// How the policy's labelled examples voted (when a rule asks `similar_to`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similar: Option<Similar>,
    /// Tiers that cannot serve this request at all, and why (a request with `tools` on a
    /// tier that cannot call them): rules that route there are skipped.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unservable_tiers: BTreeMap<String, String>,
}

/// `"<redacted>"` in place of a secret.
fn redacted<S: serde::Serializer>(_: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("<redacted>")
}

impl Features {
    pub fn extract(messages: &[ChatMessage], max_tokens: Option<u32>, caller: Caller) -> Self {
        let mut turns = 0;
        let mut system_prompt_chars = 0;
        let mut system_prompt = false;
        let mut last_user = "";
        let mut counts = TextCounts::default();
        for message in messages {
            match message.role {
                Role::System => {
                    system_prompt = true;
                    system_prompt_chars += message.content.chars().count() as u32;
                }
                Role::User => {
                    turns += 1;
                    last_user = &message.content;
                    // Code and maths earlier in the conversation still shape a follow-up
                    // like "why?", so every user message counts.
                    counts.add(&message.content);
                }
                Role::Assistant | Role::Tool => {}
            }
        }
        let Caller {
            api_key,
            tenant,
            hint,
        } = caller;
        Self {
            turns,
            system_prompt,
            system_prompt_chars,
            requested_max_tokens: max_tokens,
            last_user_chars: last_user.chars().count() as u32,
            code: counts.code_fences > 0
                || counts.code_syntax_lines >= 2
                || (counts.code_terms >= 1 && counts.code_syntax_lines >= 1)
                || counts.code_terms >= 2,
            code_fences: counts.code_fences,
            code_syntax_lines: counts.code_syntax_lines,
            code_terms: counts.code_terms,
            math: counts.math_terms > 0 || counts.math_symbols > 0 || counts.math_expressions >= 2,
            math_terms: counts.math_terms,
            math_symbols: counts.math_symbols,
            math_expressions: counts.math_expressions,
            reasoning: counts.reasoning_cues > 0,
            reasoning_cues: counts.reasoning_cues,
            script: dominant_script(last_user),
            api_key,
            tenant,
            hint,
            last_user: last_user.to_owned(),
            similar: None,
            unservable_tiers: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct TextCounts {
    code_fences: u32,
    code_syntax_lines: u32,
    code_terms: u32,
    math_terms: u32,
    math_symbols: u32,
    math_expressions: u32,
    reasoning_cues: u32,
}

/// Lines that look like source code in the common languages.
static CODE_LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?m)^\s*(?:(?:pub\s+)?fn\s+\w+\s*[(<]|def\s+\w+\s*\(|class\s+\w+\s*[:({]|#include\s*[<\x22]|import\s+[\w.{*]|from\s+[\w.]+\s+import\s|(?:const|let|var)\s+\w+\s*=|function\s*\w*\s*\(|public\s+(?:static\s+)?\w|(?i:select)\s+.+\s+(?i:from)\s|for\s*\(.*;.*;|if\s*\(.*\)\s*\{|\}\s*else\s*\{|return\s+.+;\s*$|\w+\s*\(.*\)\s*;\s*$|#!/)",
    )
    .expect("static regex")
});

/// Arithmetic and equations: `3 + 4`, `x^2`, `2x = 10`, `f(x) =`.
static MATH_EXPRESSION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\d\s*[-+*/^×÷]\s*\(?\d|\b[a-z]\s*\^\s*\d|\b\d*[a-z]\s*[-+]\s*\d+\s*=|\b[a-z]\s*\(\s*[a-z]\s*\)\s*=")
        .expect("static regex")
});

const CODE_TERMS: &[&str] = &[
    "python",
    "rust",
    "javascript",
    "typescript",
    "java",
    "golang",
    "c++",
    "c#",
    "sql",
    "bash",
    "haskell",
    "kotlin",
    "function",
    "compile",
    "compiler",
    "stack trace",
    "traceback",
    "segfault",
    "regex",
    "refactor",
    "debug",
    "unit test",
    "algorithm",
    "api",
    "json",
    "html",
    "css",
    "git",
    "docker",
    "recursion",
    "big-o",
    "null pointer",
    "exception",
];

const MATH_TERMS: &[&str] = &[
    "prove",
    "proof",
    "derive",
    "derivation",
    "derivative",
    "integral",
    "integrate",
    "equation",
    "solve for",
    "theorem",
    "lemma",
    "matrix",
    "eigenvalue",
    "probability",
    "polynomial",
    "logarithm",
    "calculus",
    "algebra",
    "geometry",
    "factorial",
    "prime number",
];

const MATH_SYMBOLS: &[&str] = &[
    "∫", "∑", "∏", "√", "π", "≤", "≥", "≠", "∞", "∂", "∈", "∀", "∃", "\\frac", "\\sum", "\\int",
    "\\sqrt",
];

const REASONING_CUES: &[&str] = &[
    "step by step",
    "step-by-step",
    "explain why",
    "explain how",
    "why does",
    "why do",
    "why is",
    "compare",
    "contrast",
    "pros and cons",
    "trade-off",
    "tradeoff",
    "analyze",
    "analyse",
    "reason about",
    "justify",
    "evaluate",
    "implications",
    "think through",
    "in detail",
    "what would happen if",
];

/// Every signal phrase in one automaton, so a prompt is scanned once; a match's pattern
/// index says which list it came from (see [`Signal::of`]).
static SIGNAL_MATCHER: LazyLock<AhoCorasick> = LazyLock::new(|| {
    let all: Vec<&str> = [CODE_TERMS, MATH_TERMS, MATH_SYMBOLS, REASONING_CUES].concat();
    phrase_matcher(&all)
});

#[derive(Clone, Copy, PartialEq, Eq)]
enum Signal {
    CodeTerm,
    MathTerm,
    MathSymbol,
    ReasoningCue,
}

impl Signal {
    fn of(pattern: usize) -> Signal {
        let code = CODE_TERMS.len();
        let math = code + MATH_TERMS.len();
        let symbols = math + MATH_SYMBOLS.len();
        if pattern < code {
            Signal::CodeTerm
        } else if pattern < math {
            Signal::MathTerm
        } else if pattern < symbols {
            Signal::MathSymbol
        } else {
            Signal::ReasoningCue
        }
    }
}

/// A case-insensitive (ASCII) leftmost-longest matcher for a list of phrases.
pub fn phrase_matcher<P: AsRef<[u8]>>(phrases: &[P]) -> AhoCorasick {
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::LeftmostLongest)
        .build(phrases)
        .expect("phrase lists are small and valid")
}

/// Whether `text[start..end]` begins and ends on word boundaries (so `rust` does not
/// match inside `trust`). Symbols such as `∑` are their own boundary.
fn on_word_boundaries(text: &[u8], start: usize, end: usize) -> bool {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let starts_clean = start == 0 || !is_word(text[start - 1]) || !is_word(text[start]);
    let ends_clean = end == text.len() || !is_word(text[end]) || !is_word(text[end - 1]);
    starts_clean && ends_clean
}

/// Pattern indexes of the matches of `matcher` in `text` that sit on word boundaries.
pub fn whole_word_matches<'a>(
    matcher: &'a AhoCorasick,
    text: &'a str,
) -> impl Iterator<Item = usize> + 'a {
    matcher.find_iter(text).filter_map(move |m| {
        on_word_boundaries(text.as_bytes(), m.start(), m.end()).then_some(m.pattern().as_usize())
    })
}

impl TextCounts {
    fn add(&mut self, text: &str) {
        // Each fenced block has an opening and a closing fence.
        self.code_fences += (text.matches("```").count() as u32).div_ceil(2);
        self.code_syntax_lines += CODE_LINE.find_iter(text).count() as u32;
        self.math_expressions += MATH_EXPRESSION.find_iter(text).count() as u32;
        for pattern in whole_word_matches(&SIGNAL_MATCHER, text) {
            match Signal::of(pattern) {
                Signal::CodeTerm => self.code_terms += 1,
                Signal::MathTerm => self.math_terms += 1,
                Signal::MathSymbol => self.math_symbols += 1,
                Signal::ReasoningCue => self.reasoning_cues += 1,
            }
        }
    }
}

/// The script most letters of `text` are written in, by broad family.
fn dominant_script(text: &str) -> &'static str {
    let mut counts = [0u32; SCRIPT_NAMES.len()];
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        counts[script_family(c)] += 1;
    }
    match counts.iter().enumerate().max_by_key(|(_, n)| **n) {
        Some((i, n)) if *n > 0 => SCRIPT_NAMES[i],
        _ => "none",
    }
}

/// Script families a policy can name in `when.script`.
pub const SCRIPT_NAMES: [&str; 9] = [
    "latin",
    "cjk",
    "cyrillic",
    "arabic",
    "greek",
    "hebrew",
    "devanagari",
    "other",
    "none",
];

fn script_family(c: char) -> usize {
    if c.is_ascii() {
        return 0;
    }
    match c.script() {
        Script::Latin => 0,
        Script::Han | Script::Hiragana | Script::Katakana | Script::Hangul | Script::Bopomofo => 1,
        Script::Cyrillic => 2,
        Script::Arabic => 3,
        Script::Greek => 4,
        Script::Hebrew => 5,
        Script::Devanagari => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: Role::User,
            content: text.to_owned(),
        }]
    }

    fn features(text: &str) -> Features {
        Features::extract(&user(text), None, Caller::default())
    }

    #[test]
    fn chit_chat_has_no_signals() {
        let f = features("Hi there! How are you doing today?");
        assert!(!f.code && !f.math && !f.reasoning, "{f:?}");
        assert_eq!(f.script, "latin");
        assert_eq!(f.turns, 1);
    }

    #[test]
    fn fenced_block_is_code() {
        let f = features("What does this print?\n```\nprint(1)\n```");
        assert_eq!(f.code_fences, 1);
        assert!(f.code);
    }

    #[test]
    fn unfenced_source_lines_are_code() {
        let f = features("def add(a, b):\n    return a + b\nimport os\n");
        assert!(f.code_syntax_lines >= 2, "{f:?}");
        assert!(f.code);
    }

    #[test]
    fn a_word_inside_another_is_not_a_term() {
        // `rust` in `trust`, `api` in `capital`: neither is a code term.
        let f = features("I trust the capital city is lovely");
        assert_eq!(f.code_terms, 0, "{f:?}");
    }

    #[test]
    fn maths_by_terms_symbols_or_expressions() {
        assert!(features("Prove that there are infinitely many primes").math);
        assert!(features("What is ∫ x dx?").math);
        assert!(features("Compute 12 * 7 and 3 + 4").math);
        assert!(!features("I have 3 cats").math);
    }

    #[test]
    fn reasoning_cues_are_found() {
        let f = features("Compare Paris and Rome, step by step");
        assert_eq!(f.reasoning_cues, 2);
        assert!(f.reasoning);
    }

    #[test]
    fn script_is_the_dominant_one() {
        assert_eq!(features("你好，今天天气怎么样？").script, "cjk");
        assert_eq!(features("Привет, как дела?").script, "cyrillic");
        assert_eq!(features("12345").script, "none");
    }

    #[test]
    fn turns_and_system_prompt_are_counted() {
        let messages = vec![
            ChatMessage {
                role: Role::System,
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "a".into(),
            },
            ChatMessage {
                role: Role::Assistant,
                content: "b".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "c".into(),
            },
        ];
        let f = Features::extract(&messages, Some(10), Caller::default());
        assert_eq!(f.turns, 2);
        assert!(f.system_prompt);
        assert_eq!(f.system_prompt_chars, 9);
        assert_eq!(f.last_user, "c");
        assert_eq!(f.requested_max_tokens, Some(10));
    }
}
