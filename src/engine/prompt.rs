//! Chat messages → the token ids a model sees: its chat template, then its tokenizer.
//!
//! The engine prefills what llama.cpp's own tokenizer gives. The router only needs the
//! count, and takes it from [`GgufTokenizer`], the same rules redone in Rust at a small
//! fraction of the cost; it is used only after it has matched llama.cpp token for token on
//! [`PROBE`] at load, and the engine compares the two counts on every request. So the
//! count the router sees is the count the engine prefills and reports in
//! `usage.prompt_tokens`. The engine and the router share one [`Prompter`] per model;
//! `tiergate route` and the router benchmark load just the vocabulary (no weights).

use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::LogOptions;

use super::tokenizer::GgufTokenizer;
use super::EngineError;
use crate::chat::{message_bytes, push_messages_key, ChatMessage};
use crate::config::ModelConfig;

/// Text the Rust tokenizer must split exactly as llama.cpp does before it is trusted:
/// prose, contractions, digits, code, runs of spaces, newlines and punctuation, other
/// scripts, emoji, SentencePiece's own space mark and text that looks like tokens.
pub const PROBE: &str = concat!(
    "Hello, world! It's 2024; we'll  test   spaces\n",
    "\n",
    "\n",
    "and\ttabs.\n",
    "fn main() {\n",
    "    let x = 3.14159 * (r as f64).powi(2); // area\n",
    "    println!(\"{x:>8.2}\");\n",
    "}\n",
    "```python\n",
    "def f(n):\n",
    "\treturn [i**2 for i in range(n) if i % 3 == 0]\n",
    "```\n",
    "println!===, Prove that √2 is irrational: suppose a/b = √2, then a² = 2b²… ∎ ---- ==== !!! ???\n",
    "Café naïve façade — «quotes» “curly” ‘single’ ½ ⅓ Ⅻ ١٢٣ ٤\n",
    "日本語のテキストと中文文本，한국어 텍스트; Русский текст; ελληνικά; עברית; العربية; हिन्दी\n",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷 <b>bold</b> <start_of_turn>model <|im_start|> <0x41> > </div> ▁▁x ▁\n",
    "   leading and trailing   \r\n",
    "\u{a0}nbsp\u{2003}em-space\u{200b}zero-width \u{feff}bom end  ",
);

/// llama.cpp's backend may be initialised once per process; every model shares it.
pub(crate) fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs every tensor at load; route it into tracing, where the
            // subscriber's filter decides (default: warnings and up).
            llama_cpp_2::send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A model's template and tokenizer. `LlamaModel` is `Sync`, so any thread may use it.
pub struct Prompter {
    model: Arc<LlamaModel>,
    template: LlamaChatTemplate,
    /// Why not, when the vocabulary's tokenizer type is not mirrored or failed the probe.
    counter: Result<GgufTokenizer, String>,
    /// Bytes of the longest token's text (special tokens included).
    max_token_bytes: u32,
    /// Token counts of recent short prompts, by their messages. Routing and the budget
    /// planner count every request, and a repeated one (every reply-cache hit) would go
    /// through llama.cpp's template code again, which costs more than the rest of a hit.
    recent_counts: quick_cache::sync::Cache<String, u32>,
}

/// Prompts whose token counts a [`Prompter`] keeps.
const RECENT_COUNTS: usize = 4096;
/// Longer prompts are counted every time: the key would cost more memory than it saves.
const RECENT_COUNT_MAX_BYTES: usize = 2048;

impl Prompter {
    /// Loads `config.path` with the given parameters and checks that its chat template (or
    /// the configured built-in one) can be applied.
    pub fn load(config: &ModelConfig, params: &LlamaModelParams) -> Result<Self, String> {
        if !config.path.is_file() {
            return Err(format!(
                "model file {} not found (run `just models` to fetch the default models)",
                config.path.display()
            ));
        }
        let model = LlamaModel::load_from_file(backend()?, &config.path, params)
            .map_err(|e| format!("cannot load {}: {e}", config.path.display()))?;
        let mut prompter = Self::new(Arc::new(model), config.chat_template.as_deref())?;
        prompter.counter =
            GgufTokenizer::from_gguf(&config.path).and_then(|counter| {
                match prompter.probe(&counter) {
                    None => Ok(counter),
                    Some(difference) => {
                        Err(format!("differs from llama.cpp on the probe, {difference}"))
                    }
                }
            });
        if let Err(why) = &prompter.counter {
            tracing::warn!(model = %config.id, %why,
                "the Rust tokenizer is not used; the router counts prompts with llama.cpp's (slower)");
        }
        Ok(prompter)
    }

    /// The vocabulary and template only: enough to count prompt tokens.
    pub fn load_vocab(config: &ModelConfig) -> Result<Self, String> {
        Self::load(config, &LlamaModelParams::default().with_vocab_only(true))
    }

    fn new(model: Arc<LlamaModel>, chat_template: Option<&str>) -> Result<Self, String> {
        let template = match chat_template {
            Some(name) => {
                LlamaChatTemplate::new(name).map_err(|e| format!("chat_template: {e}"))?
            }
            None => model.chat_template(None).map_err(|_| {
                "the model file has no chat template; set `chat_template` (e.g. \"gemma\") in config"
                    .to_owned()
            })?,
        };
        // Fail at start-up, not on the first request, when llama.cpp does not know the template.
        let probe = LlamaChatMessage::new("user".into(), "hi".into()).map_err(|e| e.to_string())?;
        model
            .apply_chat_template(&template, &[probe], true)
            .map_err(|e| {
                format!(
                    "chat template cannot be applied ({e}); name one of llama.cpp's built-in templates"
                )
            })?;
        let vocab = model.vocab();
        let max_token_bytes = vocab
            .tokens()
            .map(|t| vocab.token_to_piece(t, true, None).len() as u32)
            .max()
            .unwrap_or(1);
        Ok(Self {
            model,
            template,
            counter: Err("not loaded".into()),
            max_token_bytes,
            recent_counts: quick_cache::sync::Cache::new(RECENT_COUNTS),
        })
    }

    /// The first difference between `counter` and llama.cpp on [`PROBE`], alone and as a
    /// templated conversation.
    fn probe(&self, counter: &GgufTokenizer) -> Option<String> {
        let conversation = [
            ChatMessage {
                role: crate::chat::Role::System,
                content: "Answer briefly.".into(),
            },
            ChatMessage {
                role: crate::chat::Role::User,
                content: PROBE.into(),
            },
        ];
        // The template was applied once at load; should it fail here, the plain probe
        // still decides.
        let templated = self.render(&conversation).ok();
        let difference = std::iter::once(PROBE)
            .chain(templated.as_deref())
            .find_map(|text| self.difference(counter, text));
        difference
    }

    /// Where `counter` and llama.cpp first disagree on `text`, if they do.
    pub fn difference(&self, counter: &GgufTokenizer, text: &str) -> Option<String> {
        let expected: Vec<u32> = self
            .llama_tokenize(text)
            .iter()
            .map(|t| t.0 as u32)
            .collect();
        let got = counter.tokenize(text);
        if got == expected {
            return None;
        }
        let at = expected
            .iter()
            .zip(&got)
            .position(|(a, b)| a != b)
            .unwrap_or(expected.len().min(got.len()));
        let window = |ids: &[u32]| ids[at.saturating_sub(2)..ids.len().min(at + 4)].to_vec();
        Some(format!(
            "token {at}: llama.cpp {:?}, rust {:?} ({} vs {} tokens)",
            window(&expected),
            window(&got),
            expected.len(),
            got.len()
        ))
    }

    /// The Rust tokenizer, or why it is not used.
    pub fn counter(&self) -> Result<&GgufTokenizer, &str> {
        self.counter.as_ref().map_err(String::as_str)
    }

    pub fn model(&self) -> &Arc<LlamaModel> {
        &self.model
    }

    /// Bytes of the longest token's text.
    pub fn max_token_bytes(&self) -> u32 {
        self.max_token_bytes
    }

    /// The templated conversation with the assistant's turn opened, as text.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.as_str().to_owned(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Template(format!("a message contains a NUL byte ({e})")))?;
        self.model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// The templated conversation as the token ids the engine prefills (llama.cpp's).
    pub fn tokenize(&self, messages: &[ChatMessage]) -> Result<Vec<LlamaToken>, EngineError> {
        Ok(self.llama_tokenize(&self.render(messages)?))
    }

    /// How many tokens [`tokenize`](Self::tokenize) gives, the fast way when it can.
    pub fn count(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        let key = recent_count_key(messages);
        if let Some(count) = key.as_ref().and_then(|key| self.recent_counts.get(key)) {
            return Ok(count);
        }
        let prompt = self.render(messages)?;
        let count = match &self.counter {
            Ok(counter) => counter.count(&prompt),
            Err(_) => self.llama_tokenize(&prompt).len() as u32,
        };
        if let Some(key) = key {
            self.recent_counts.insert(key, count);
        }
        Ok(count)
    }

    /// llama.cpp's tokens for already templated text.
    pub fn llama_tokenize(&self, text: &str) -> Vec<LlamaToken> {
        // add_special: BOS where the model wants one (llama.cpp's templates do not write it).
        // parse_special: the template's own markers must become control tokens.
        self.model.vocab().tokenize(text.as_bytes(), true, true)
    }
}

/// The key [`Prompter::count`] remembers a short prompt's count by: each message's role,
/// its length and its text, so no two prompts share one. `None` for a long prompt.
fn recent_count_key(messages: &[ChatMessage]) -> Option<String> {
    let bytes = message_bytes(messages);
    if bytes > RECENT_COUNT_MAX_BYTES {
        return None;
    }
    let mut key = String::with_capacity(bytes);
    push_messages_key(&mut key, messages);
    Some(key)
}

#[cfg(test)]
mod recent_count_tests {
    use super::*;
    use crate::chat::Role;

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
        }
    }

    #[test]
    fn prompts_that_differ_in_roles_or_message_boundaries_have_different_keys() {
        let one = [message(Role::User, "ab:c")];
        let split = [message(Role::User, "ab"), message(Role::User, "c")];
        let system = [message(Role::System, "ab:c")];
        let keys = [&one[..], &split[..], &system[..]].map(recent_count_key);
        assert!(keys.iter().all(Option::is_some));
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_eq!(recent_count_key(&one), keys[0]);
    }

    #[test]
    fn long_prompts_are_not_remembered() {
        let long = [message(Role::User, &"x".repeat(RECENT_COUNT_MAX_BYTES))];
        assert_eq!(recent_count_key(&long), None);
    }
}
