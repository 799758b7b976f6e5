//! The router's Rust tokenizer against llama.cpp's, token for token, on both real
//! vocabularies: prose, code, every script the probe has, special tokens, and thousands of
//! random strings built from the characters tokenizers get wrong.

mod common;

use common::shipped_config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiergate::chat::{ChatMessage, Role};
use tiergate::engine::prompt::{Prompter, PROBE};

fn prompters() -> Vec<(String, Prompter)> {
    let config = shipped_config();
    config
        .models
        .iter()
        .map(|model| {
            let prompter = Prompter::load_vocab(model).unwrap_or_else(|e| panic!("{e}"));
            (model.id.clone(), prompter)
        })
        .collect()
}

/// Pieces that exercise each rule: contractions, digit runs, whitespace of every kind and
/// length, punctuation runs (SentencePiece ties), other scripts, combining marks, emoji
/// sequences, SentencePiece's space mark, and texts of special and byte tokens.
const PIECES: &[&str] = &[
    "the",
    " the",
    "The",
    "ing",
    "tion",
    "'s",
    "'t",
    "'re",
    "'ll",
    "'d",
    "'m",
    "'ve",
    "'x",
    "'",
    "\"",
    "0",
    "7",
    "12",
    "123",
    "2024",
    "3.14",
    "1,000",
    " ",
    "  ",
    "   ",
    "    ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "\u{a0}",
    "\u{2003}",
    "\u{3000}",
    "\u{200b}",
    "-",
    "--",
    "---",
    "----",
    "=",
    "==",
    "===",
    "!",
    "!!",
    "?",
    "...",
    "…",
    "*",
    "**",
    "#",
    "##",
    "```",
    "`",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "<",
    ">",
    "</",
    "/>",
    "> </",
    "_",
    "__",
    "::",
    "->",
    "=>",
    "||",
    "&&",
    "é",
    "e\u{301}",
    "ß",
    "Ω",
    "ж",
    "中",
    "日本",
    "한",
    "ع",
    "ह",
    "\u{94d}",
    "ไทย",
    "😀",
    "👍🏽",
    "👨\u{200d}👩\u{200d}👧",
    "🇫🇷",
    "½",
    "Ⅻ",
    "١",
    "²",
    "\u{2581}",
    "\u{2581}\u{2581}",
    "<0x41>",
    "<b>",
    "</b>",
    "<td>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|im_start|>",
    "<|im_end|>",
    "<bos>",
    "<eos>",
    "[multimodal]",
    "fn",
    "def",
    "return",
    "println!",
    "λ",
    "∑",
    "√",
    "≤",
    "\u{feff}",
    "\u{ffff}",
    "\u{10ffff}",
    "\u{e000}",
    "Hello",
    "world",
    "tokenization",
    "supercalifragilistic",
];

fn random_text(rng: &mut StdRng) -> String {
    let pieces = rng.random_range(1..40);
    (0..pieces)
        .map(|_| PIECES[rng.random_range(0..PIECES.len())])
        .collect()
}

fn assert_same(prompter: &Prompter, model: &str, text: &str) {
    let counter = prompter
        .counter()
        .unwrap_or_else(|why| panic!("{model}: the Rust tokenizer is not used: {why}"));
    if let Some(difference) = prompter.difference(counter, text) {
        panic!("{model} on {text:?}: {difference}");
    }
    assert_eq!(
        counter.count(text) as usize,
        prompter.llama_tokenize(text).len(),
        "{model}: cached count on {text:?}"
    );
}

#[test]
fn both_vocabularies_pass_the_probe_at_load() {
    for (model, prompter) in prompters() {
        assert_same(&prompter, &model, PROBE);
    }
}

#[test]
fn matches_llama_cpp_on_random_texts() {
    for (model, prompter) in prompters() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..3_000 {
            assert_same(&prompter, &model, &random_text(&mut rng));
        }
    }
}

#[test]
fn matches_llama_cpp_on_templated_conversations() {
    let document = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let source = include_str!("../src/engine/tokenizer.rs");
    for (model, prompter) in prompters() {
        for content in [document.as_str(), source, PROBE, "", " ", "hi"] {
            let messages = [
                ChatMessage {
                    role: Role::System,
                    content: "You are terse.".into(),
                },
                ChatMessage {
                    role: Role::User,
                    content: content.into(),
                },
            ];
            let expected = prompter.tokenize(&messages).expect("llama.cpp").len() as u32;
            assert_eq!(
                prompter.count(&messages).expect("count"),
                expected,
                "{model}: {} bytes of content",
                content.len()
            );
            let templated = prompter.render(&messages).expect("template");
            assert_same(&prompter, &model, &templated);
        }
    }
}
