//! Chat messages → the token ids a model sees: its chat template, then its tokenizer.
//!
//! This is llama.cpp's own tokenizer for the GGUF's own vocabulary, so the count the router
//! sees is exactly the count the engine prefills and reports in `usage.prompt_tokens`.
//! The engine and the router share one [`Prompter`] per model; `tiergate route` and the
//! router benchmark load just the vocabulary (a few MB, no weights).

use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::LogOptions;

use super::{ChatMessage, EngineError};
use crate::config::ModelConfig;

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
}

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
        Self::new(Arc::new(model), config.chat_template.as_deref())
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
        Ok(Self { model, template })
    }

    pub fn model(&self) -> &Arc<LlamaModel> {
        &self.model
    }

    /// The templated conversation with the assistant's turn opened, as token ids.
    pub fn tokenize(&self, messages: &[ChatMessage]) -> Result<Vec<LlamaToken>, EngineError> {
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.as_str().to_owned(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Template(format!("a message contains a NUL byte ({e})")))?;
        let prompt = self
            .model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        // add_special: BOS where the model wants one (llama.cpp's templates do not write it).
        // parse_special: the template's own markers must become control tokens.
        Ok(self.model.vocab().tokenize(prompt.as_bytes(), true, true))
    }
}
