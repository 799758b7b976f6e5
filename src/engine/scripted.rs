//! A scripted backend behind the same [`Engine`] trait, for fault injection and for fast
//! tests of the timing logic above the engine (budgets, watchdog, cache sharing, drain)
//! under tokio's paused clock. It generates nothing: every request plays the script set at
//! the time it was submitted, a list of token events with delays between them.
//!
//! Never a stand-in for the real path: the end-to-end tests run the llama.cpp engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use super::load::LoadSnapshot;
use super::{
    Engine, EngineError, FinishReason, Forecast, GenerationRequest, Health, ModelInfo,
    PromptLimits, StageTimings, TokenEvent, TokenStream, Usage,
};
use crate::chat::ChatMessage;

/// One thing a scripted sequence does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing happens for this long (on tokio's clock, so a paused test skips it).
    Wait(Duration),
    /// One piece of text, counted as one completion token.
    Text(String),
    /// The last event of a successful generation.
    Finish(FinishReason),
    /// The last event of a failed one.
    Fail(EngineError),
}

/// What each request submitted to a [`ScriptedEngine`] plays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Script(pub Vec<Step>);

impl Script {
    /// `pieces` tokens, the first after `first_after`, the rest `gap` apart, then `stop`.
    pub fn tokens(pieces: usize, first_after: Duration, gap: Duration) -> Self {
        let mut steps = Vec::with_capacity(2 * pieces + 1);
        for i in 0..pieces {
            steps.push(Step::Wait(if i == 0 { first_after } else { gap }));
            steps.push(Step::Text(format!("t{i} ")));
        }
        steps.push(Step::Finish(FinishReason::Stop));
        Self(steps)
    }

    /// The text a request playing this script receives.
    pub fn text(&self) -> String {
        self.0
            .iter()
            .filter_map(|step| match step {
                Step::Text(text) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Settings a test may change while requests run; each request reads them when submitted.
#[derive(Debug, Clone, Default)]
struct Settings {
    script: Script,
    load: LoadSnapshot,
    /// Returned by `submit` instead of a stream while set.
    refuse: Option<EngineError>,
    loading: bool,
    /// Set: the backend is down for this reason (its thread died).
    down: Option<String>,
    /// Counting fails, as it does for a prompt the chat template refuses.
    counting_fails: bool,
    /// Positions one sequence may use; prompts beyond it are refused as llama.cpp's are.
    context: Option<u32>,
}

pub struct ScriptedEngine {
    info: ModelInfo,
    settings: Mutex<Settings>,
    submitted: AtomicUsize,
    /// Sequences still playing: a cancelled one leaves at its next step.
    live: Arc<AtomicUsize>,
}

impl ScriptedEngine {
    /// Ready, idle (an empty load), playing 4 tokens 10 ms apart.
    pub fn new(id: &str, tier: &str) -> Self {
        let gap = Duration::from_millis(10);
        Self {
            info: ModelInfo {
                id: id.to_owned(),
                tier: tier.to_owned(),
            },
            settings: Mutex::new(Settings {
                script: Script::tokens(4, gap, gap),
                ..Settings::default()
            }),
            submitted: AtomicUsize::new(0),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn into_backend(self) -> Arc<dyn Engine> {
        Arc::new(self)
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_script(&self, script: Script) {
        self.settings().script = script;
    }

    /// What `load()` reports, and so what the budget planner predicts from.
    pub fn set_load(&self, load: LoadSnapshot) {
        self.settings().load = load;
    }

    pub fn refuse_with(&self, error: Option<EngineError>) {
        self.settings().refuse = error;
    }

    pub fn set_loading(&self, loading: bool) {
        self.settings().loading = loading;
    }

    pub fn set_context(&self, context: Option<u32>) {
        self.settings().context = context;
    }

    /// Makes counting fail, as for a prompt the chat template refuses.
    pub fn fail_counting(&self, fails: bool) {
        self.settings().counting_fails = fails;
    }

    /// Marks the backend down (as a model thread that panicked is) or up again.
    pub fn set_down(&self, reason: Option<&str>) {
        self.settings().down = reason.map(str::to_owned);
    }

    /// Requests that got a stream.
    pub fn submitted(&self) -> usize {
        self.submitted.load(Ordering::SeqCst)
    }

    /// Sequences playing now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

/// A prompt's size here: its words plus 4 per message for the template, roughly what a
/// chat template adds; tests only need counts that grow with the prompt.
fn count_words(messages: &[ChatMessage]) -> u32 {
    messages
        .iter()
        .map(|m| m.content.split_whitespace().count() as u32 + 4)
        .sum()
}

/// Decrements the live count however the playing task ends.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine for ScriptedEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, EngineError> {
        let settings = self.settings().clone();
        if settings.loading {
            return Err(EngineError::Loading {
                model: self.info.id.clone(),
            });
        }
        if let Some(reason) = settings.down {
            return Err(EngineError::Unavailable {
                model: self.info.id.clone(),
                reason,
            });
        }
        if let Some(refusal) = settings.refuse {
            return Err(refusal);
        }
        let prompt_tokens = count_words(&request.messages);
        if let Some(context) = settings.context {
            if prompt_tokens >= context {
                return Err(EngineError::PromptTooLong {
                    prompt_tokens,
                    context,
                });
            }
        }
        let max_tokens = request.max_tokens.unwrap_or(u32::MAX);
        let (tx, rx) = mpsc::unbounded_channel();
        self.submitted.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        let live = LiveGuard(self.live.clone());
        tokio::spawn(async move {
            let _live = live;
            let mut generated = 0;
            for step in settings.script.0 {
                let event = match step {
                    Step::Wait(pause) => {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => continue,
                            // The receiver went away: the sequence is cancelled.
                            () = tx.closed() => return,
                        }
                    }
                    Step::Text(_) if generated >= max_tokens => TokenEvent::Finished {
                        finish_reason: FinishReason::Length,
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens: generated,
                            cached_prompt_tokens: Some(0),
                        },
                        timings: StageTimings::default(),
                    },
                    Step::Text(text) => {
                        generated += 1;
                        TokenEvent::Text(text)
                    }
                    Step::Finish(finish_reason) => TokenEvent::Finished {
                        finish_reason,
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens: generated,
                            cached_prompt_tokens: Some(0),
                        },
                        timings: StageTimings::default(),
                    },
                    Step::Fail(error) => TokenEvent::Failed(error),
                };
                let last = !matches!(event, TokenEvent::Text(_) | TokenEvent::Scored { .. });
                if tx.send(event).is_err() || last {
                    return;
                }
            }
        });
        Ok(TokenStream::new(prompt_tokens, rx))
    }

    fn health(&self) -> Health {
        let settings = self.settings();
        match (&settings.down, settings.loading) {
            (Some(reason), _) => Health::Down(reason.clone()),
            (None, true) => Health::Loading,
            (None, false) => Health::Ready,
        }
    }

    fn limits(&self) -> Option<PromptLimits> {
        // Words count as tokens here, and no test word is longer than this.
        let context = self.settings().context?;
        Some(PromptLimits {
            context,
            max_token_bytes: 64,
        })
    }

    fn forecast(&self, prompt_tokens: u32) -> Forecast {
        self.settings().load.forecast(prompt_tokens)
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        if self.settings().counting_fails {
            return Err(EngineError::Template(
                "the template refuses this prompt".into(),
            ));
        }
        if self.settings().loading {
            return Err(EngineError::Loading {
                model: self.info.id.clone(),
            });
        }
        Ok(count_words(messages))
    }
}
