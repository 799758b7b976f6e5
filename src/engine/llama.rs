//! The real engine: one OS thread per model owns the llama.cpp model and context for the
//! life of the process and runs the continuous-batching step loop.
//!
//! ```text
//! submit() ──(template, tokenize, check context)──► bounded queue ──► model thread
//!                                                                      admit → prefill chunks
//!                                                                      → one decode over every
//!                                                                      live sequence → sample → send
//! ```
//!
//! The model itself (`LlamaModel`) is `Sync`, so prompts are templated and tokenized on the
//! caller's thread; only the context, which is not `Send`, stays on the model thread.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::{BatchAddError, LlamaBatch};
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};

use super::grammar::{
    judges_lead_bytes, Constraint, FirstBytes, Grammar, Grammars, SeqSampler, NARROWS_WITH_BIASES,
};
use super::load::LoadMeter;
use super::logprobs::{log_softmax_top, TokenLogprob, TopLogprob};
use super::prompt::{backend, Prompter};
use super::schedule::{
    KvShrink, Limits, Release, Scheduler, SeqId, SeqState, Sequence, Waiting, Work,
};
use super::text::{StopMatcher, Utf8Decoder};
use super::{
    Engine, EngineError, FinishReason, Forecast, GenerationRequest, Health, ModelInfo,
    PromptLimits, StageTimings, TokenEvent, TokenStream, Usage,
};
use crate::chat::{ChatMessage, SamplingParams};
use crate::config::ModelConfig;
use crate::metrics::EngineMetrics;

/// What exists once the model thread has loaded the model.
struct Loaded {
    prompter: Arc<Prompter>,
    /// The most positions one sequence may use: `n_ctx`, capped by the training context.
    context_per_sequence: u32,
}

/// The runner's side of one request: how to sample it and how to answer whoever submitted
/// it. The scheduler carries it from the queue to the end of the sequence.
struct Requester {
    sampling: SamplingParams,
    ignore_eos: bool,
    /// The grammar the reply must follow (`response_format`).
    grammar: Option<Grammar>,
    /// `Some(k)`: report each token's log probability and its `k` likeliest alternatives.
    logprobs: Option<u8>,
    /// Log probabilities of tokens whose text is not sent yet (held for a stop string or
    /// an incomplete UTF-8 character): they go out with the text they became.
    pending_logprobs: Vec<TokenLogprob>,
    stops: StopMatcher,
    utf8: Utf8Decoder,
    events: mpsc::UnboundedSender<TokenEvent>,
    enqueued_at: Instant,
    /// Set when a slot is found.
    admitted_at: Instant,
    queue_time: Duration,
    first_token_at: Option<Instant>,
    /// The request's span, parent of the stage spans.
    request_span: tracing::Span,
    /// `queue` until a slot is found, `prefill` until the first token, then `decode`.
    stage_span: tracing::Span,
}

impl Requester {
    fn send_text(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        let event = match self.logprobs {
            None => TokenEvent::Text(text),
            Some(_) => TokenEvent::Scored {
                text,
                logprobs: std::mem::take(&mut self.pending_logprobs),
            },
        };
        // A closed receiver is noticed by the cancellation check before the next step.
        let _ = self.events.send(event);
    }

    /// The client went away: the sequence leaves before the next step.
    fn is_gone(&self) -> bool {
        self.events.is_closed()
    }
}

/// What the queue carries from `submit` to the model thread.
type Queued = Waiting<Requester>;

/// Places in a model's queue: `submit` takes one, the model thread gives it back when it
/// admits the request or drops it. This, not the channel, bounds how many requests wait:
/// the step loop moves the channel's contents into the scheduler every iteration.
struct QueuePlaces {
    taken: AtomicUsize,
    capacity: usize,
    /// `tiergate_waiting_requests`, kept equal to `taken`.
    gauge: Gauge,
}

impl QueuePlaces {
    /// False when the queue is full.
    fn take(&self) -> bool {
        let taken = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.gauge.inc();
        }
        taken
    }

    fn give_back(&self, places: usize) {
        if places > 0 {
            self.taken.fetch_sub(places, Ordering::AcqRel);
            self.gauge.dec_by(places as i64);
        }
    }
}

pub struct LlamaEngine {
    info: ModelInfo,
    /// Slots and KV cells of the context: a request with `n` choices takes `n` slots.
    slots: u32,
    total_cells: u32,
    /// `response_format` schemas compiled for this model, each once.
    grammars: Grammars,
    max_tokens_default: u32,
    queue_capacity: usize,
    /// Set once by the model thread after a successful load.
    loaded: Arc<OnceLock<Loaded>>,
    /// Set by the model thread if it fails to load or stops.
    stopped: Arc<OnceLock<String>>,
    /// Bounded like `places` (which is what refuses a full queue); the model thread owns
    /// the receiving end and drains it between steps.
    queue: SyncSender<Queued>,
    places: Arc<QueuePlaces>,
    metrics: EngineMetrics,
    /// Written by the model thread, read by the budget planner.
    load: Arc<LoadMeter>,
}

/// Resolves when the model thread has loaded its model (or failed to).
pub type ReadySignal = oneshot::Receiver<Result<(), String>>;

/// How often an idle or stalled model thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The owner's handle on a model thread. The server stops and joins every model thread
/// before it returns: a thread still freeing its llama.cpp context while the process runs
/// its exit handlers crashes the process.
pub struct ModelThread {
    model: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl ModelThread {
    /// Asks the thread to stop after its current step (sequences still live are dropped,
    /// which ends their streams) and waits up to `within` for it to free the model.
    pub async fn stop(self, within: Duration) {
        self.stop.store(true, Ordering::Release);
        let model = self.model;
        let joined = tokio::task::spawn_blocking(move || self.handle.join());
        match tokio::time::timeout(within, joined).await {
            Ok(Ok(Ok(()))) => tracing::debug!(%model, "model thread stopped"),
            Ok(_) => tracing::error!(%model, "model thread panicked"),
            Err(_) => tracing::warn!(%model, ?within, "model thread did not stop in time"),
        }
    }
}

impl LlamaEngine {
    /// Spawns the model thread and returns at once; the model loads in the background and
    /// the [`ReadySignal`] says how that went.
    pub fn start(
        config: ModelConfig,
        metrics: EngineMetrics,
    ) -> std::io::Result<(Arc<Self>, ReadySignal, ModelThread)> {
        let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let (ready_tx, ready_rx) = oneshot::channel();
        let loaded = Arc::new(OnceLock::new());
        let stopped = Arc::new(OnceLock::new());
        let load = Arc::new(LoadMeter::new(config.slots));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let places = Arc::new(QueuePlaces {
            taken: AtomicUsize::new(0),
            capacity: config.queue_capacity,
            gauge: metrics.waiting_requests.clone(),
        });
        let engine = Arc::new(Self {
            info: ModelInfo {
                id: config.id.clone(),
                tier: config.tier.clone(),
            },
            grammars: Grammars::default(),
            slots: config.slots,
            total_cells: config.n_ctx,
            max_tokens_default: config.max_tokens_default,
            queue_capacity: config.queue_capacity,
            loaded: loaded.clone(),
            stopped: stopped.clone(),
            queue: queue_tx,
            places: places.clone(),
            metrics: metrics.clone(),
            load: load.clone(),
        });
        let model = config.id.clone();
        let handle = std::thread::Builder::new()
            .name(format!("model-{}", config.id))
            .spawn(move || {
                let id = config.id.clone();
                let channels = ThreadChannels {
                    queue: queue_rx,
                    places,
                    ready: ready_tx,
                    stop: stop_flag,
                };
                let up = metrics.up.clone();
                // A panic on this thread must still mark the model down, so that requests
                // go elsewhere instead of queueing for a thread that is gone.
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    model_thread(config, &loaded, channels, metrics, load)
                }));
                let reason = match outcome {
                    Ok(Ok(())) => "the model thread stopped".to_owned(),
                    Ok(Err(reason)) => {
                        tracing::error!(model = %id, %reason, "model thread failed");
                        reason
                    }
                    Err(panic) => {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        let reason = format!("the model thread panicked: {message}");
                        tracing::error!(model = %id, %reason, "model down");
                        reason
                    }
                };
                up.set(0);
                let _ = stopped.set(reason);
            })?;
        Ok((
            engine,
            ready_rx,
            ModelThread {
                model,
                stop,
                handle,
            },
        ))
    }

    fn loaded(&self) -> Result<&Loaded, EngineError> {
        if let Some(reason) = self.stopped.get() {
            return Err(EngineError::Unavailable {
                model: self.info.id.clone(),
                reason: reason.clone(),
            });
        }
        self.loaded.get().ok_or_else(|| EngineError::Loading {
            model: self.info.id.clone(),
        })
    }
}

impl Engine for LlamaEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn health(&self) -> Health {
        match (self.stopped.get(), self.loaded.get()) {
            (Some(reason), _) => Health::Down(reason.clone()),
            (None, Some(_)) => Health::Ready,
            (None, None) => Health::Loading,
        }
    }

    fn limits(&self) -> Option<PromptLimits> {
        let loaded = self.loaded.get()?;
        Some(PromptLimits {
            context: loaded.context_per_sequence,
            max_token_bytes: loaded.prompter.max_token_bytes(),
        })
    }

    fn forecast(&self, prompt_tokens: u32) -> Forecast {
        self.load.snapshot().forecast(prompt_tokens)
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        self.loaded()?.prompter.count(messages)
    }

    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, EngineError> {
        let loaded = self.loaded()?;
        if request.tools.is_some() {
            // The gateway routes tool calls elsewhere; this guards a direct caller.
            let why = self.calls_tools().err().unwrap_or_default();
            return Err(EngineError::InvalidParameter {
                param: "tools",
                message: format!("`tools` is not supported: {why}"),
            });
        }
        let model = loaded.prompter.model();
        let vocabulary = model.n_vocab();
        if let Some(&(token, _)) = request
            .sampling
            .logit_bias
            .iter()
            .find(|&&(token, _)| token >= vocabulary)
        {
            return Err(EngineError::InvalidParameter {
                param: "logit_bias",
                message: format!(
                    "`logit_bias` names token {token}, but model `{}` has token ids 0 to {}",
                    self.info.id,
                    vocabulary - 1
                ),
            });
        }
        let grammar = self
            .grammars
            .for_format(&request.format, model)
            .map_err(|why| EngineError::InvalidParameter {
                param: "response_format",
                message: format!("`response_format` cannot be enforced: {why}"),
            })?;
        let prompt_text = loaded.prompter.render(&request.messages)?;
        let prompt = loaded.prompter.llama_tokenize(&prompt_text);
        let prompt_tokens = prompt.len() as u32;
        // The router counted this prompt with the Rust tokenizer; check it against the
        // tokens that are prefilled (a few µs against llama.cpp's milliseconds).
        if let Ok(counter) = loaded.prompter.counter() {
            let counted = counter.count(&prompt_text);
            if counted != prompt_tokens {
                self.metrics.prompt_count_mismatches.inc();
                tracing::warn!(model = %self.info.id, counted, prompt_tokens,
                    "the router's token count differs from llama.cpp's");
            }
        }
        let context = loaded.context_per_sequence;
        // At least one position must be left to generate into.
        if prompt_tokens >= context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                context,
            });
        }
        let max_new_tokens = match request.max_tokens {
            Some(max_tokens) if prompt_tokens.saturating_add(max_tokens) > context => {
                return Err(EngineError::ContextLengthExceeded {
                    prompt_tokens,
                    max_tokens,
                    context,
                });
            }
            Some(max_tokens) => max_tokens,
            None => self
                .max_tokens_default
                .min(request.max_tokens_cap.unwrap_or(u32::MAX))
                .min(context - prompt_tokens),
        };

        let choices = request.n.max(1);
        let needed = u64::from(choices) * u64::from(prompt_tokens + max_new_tokens);
        if choices > self.slots || needed > u64::from(self.total_cells) {
            return Err(EngineError::InvalidParameter {
                param: "n",
                message: format!(
                    "`n` = {choices} needs {choices} slots and {needed} KV cells ({prompt_tokens} \
                     prompt + {max_new_tokens} completion tokens each); model `{}` has {} slots \
                     and {} cells",
                    self.info.id, self.slots, self.total_cells
                ),
            });
        }

        let queue_span = tracing::debug_span!(
            parent: &request.span,
            "queue",
            model = %self.info.id,
            prompt_tokens,
        );
        let enqueued_at = Instant::now();
        let (requesters, streams): (Vec<Requester>, Vec<TokenStream>) = (0..choices)
            .map(|choice| {
                let (events, events_rx) = mpsc::unbounded_channel();
                let mut sampling = request.sampling.clone();
                // Each choice draws its own tokens: a request's seed seeds choice 0, and the
                // next seeds each next one (never u32::MAX, llama.cpp's "random").
                sampling.seed = sampling.seed.map(|seed| {
                    ((u64::from(seed) + u64::from(choice)) % u64::from(u32::MAX)) as u32
                });
                let requester = Requester {
                    sampling,
                    ignore_eos: request.ignore_eos,
                    grammar: grammar.clone(),
                    logprobs: request.logprobs,
                    pending_logprobs: Vec::new(),
                    stops: StopMatcher::new(request.stop.clone()),
                    utf8: Utf8Decoder::default(),
                    events,
                    enqueued_at,
                    admitted_at: enqueued_at,
                    queue_time: Duration::ZERO,
                    first_token_at: None,
                    request_span: request.span.clone(),
                    stage_span: if choice == 0 {
                        queue_span.clone()
                    } else {
                        tracing::Span::none()
                    },
                };
                (requester, TokenStream::new(prompt_tokens, events_rx))
            })
            .unzip();
        let mut requesters = requesters.into_iter();
        let Some(payload) = requesters.next() else {
            return Err(EngineError::Decode("no choice to generate".into()));
        };
        let siblings: Vec<Requester> = requesters.collect();
        let queued = Waiting {
            prompt,
            max_new_tokens,
            payload,
            siblings,
        };
        let mut streams = streams.into_iter();
        let Some(first) = streams.next() else {
            return Err(EngineError::Decode("no choice to generate".into()));
        };
        let stream = first.with_siblings(streams.collect());
        let full = || EngineError::QueueFull {
            model: self.info.id.clone(),
            capacity: self.queue_capacity,
        };
        // Taken before sending: the model thread gives the place back on admission,
        // which may come before try_send returns.
        if !self.places.take() {
            return Err(full());
        }
        // Before sending: the model thread's next published load must include it.
        self.load.queued(prompt_tokens);
        match self.queue.try_send(queued) {
            Ok(()) => Ok(stream),
            Err(err) => {
                self.places.give_back(1);
                Err(match err {
                    TrySendError::Full(_) => full(),
                    TrySendError::Disconnected(_) => EngineError::Unavailable {
                        model: self.info.id.clone(),
                        reason: "the model thread stopped".into(),
                    },
                })
            }
        }
    }
}

/// What the model thread receives from its owner.
struct ThreadChannels {
    queue: Receiver<Queued>,
    places: Arc<QueuePlaces>,
    ready: oneshot::Sender<Result<(), String>>,
    stop: Arc<AtomicBool>,
}

/// Body of the model thread: load, hand over [`Loaded`], signal ready, run the step loop.
fn model_thread(
    config: ModelConfig,
    loaded_slot: &OnceLock<Loaded>,
    channels: ThreadChannels,
    metrics: EngineMetrics,
    load: Arc<LoadMeter>,
) -> Result<(), String> {
    let ThreadChannels {
        queue,
        places,
        ready,
        stop,
    } = channels;
    let setup = load_model(&config);
    let (prompter, context_params, context_per_sequence) = match setup {
        Ok(parts) => parts,
        Err(reason) => {
            let _ = ready.send(Err(reason.clone()));
            return Err(reason);
        }
    };
    let model = prompter.model().clone();
    let ctx = match model.new_context(backend()?, context_params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let reason = format!("cannot create a context: {e}");
            let _ = ready.send(Err(reason.clone()));
            return Err(reason);
        }
    };
    tracing::info!(
        model = %config.id,
        tier = %config.tier,
        n_ctx = ctx.n_ctx(),
        context_per_sequence,
        slots = config.slots,
        threads = config.threads,
        n_gpu_layers = config.n_gpu_layers,
        "model loaded"
    );
    // Reusing a prefix truncates a slot's cells to it; a unified pool would keep cells
    // other slots need. Sliding-window layers are checked per reuse (`usable_prefix`).
    let prefix_cache = config.prefix_cache && !config.kv_unified;
    if config.prefix_cache && !prefix_cache {
        tracing::info!(model = %config.id, "prefix cache off: needs a split KV cache");
    }
    let sliding_window = sliding_window(&model);
    tracing::debug!(model = %config.id, ?sliding_window, prefix_cache, "prefix reuse");
    let total_cells = ctx.n_ctx();
    // llama.cpp clamps n_batch to n_ctx; plan with what it actually allotted.
    let batch_capacity = ctx.n_batch() as usize;
    let mut step_loop = StepLoop {
        ctx,
        model: &model,
        batch: LlamaBatch::new(batch_capacity, 1),
        scheduler: Scheduler::new(Limits {
            slots: config.slots,
            total_cells,
            batch_capacity,
            prefill_chunk: config.prefill_chunk as usize,
            prefix_cache,
            // The fault drops the window check, and with it the guard the tests look for.
            sliding_window: sliding_window.filter(|_| !config.fault_reuse_past_window),
        }),
        samplers: (0..config.slots).map(|_| None).collect(),
        grammar_prototypes: HashMap::new(),
        places,
        metrics,
        load,
        step_delay: Duration::from_millis(config.fault_step_delay_ms),
        panic_in_steps: (config.fault_panic_after_steps > 0)
            .then_some(config.fault_panic_after_steps),
        stop,
        model_id: config.id.clone(),
        eog_tokens: {
            let vocab = model.vocab();
            vocab.tokens().filter(|&t| vocab.is_eog(t)).collect()
        },
        first_bytes: None,
    };
    // Measured before the model says it is ready: a request queued during the warm-up
    // would wait behind it, and its TTFT budget with it.
    step_loop.warm_up();
    let _ = loaded_slot.set(Loaded {
        prompter: Arc::new(prompter),
        context_per_sequence,
    });
    step_loop.metrics.up.set(1);
    let _ = ready.send(Ok(()));
    step_loop.run(&queue);
    Ok(())
}

/// The attention window of the model's sliding-window layers (Gemma 3: 512), from the GGUF.
fn sliding_window(model: &LlamaModel) -> Option<u32> {
    let arch = model.meta_val_str("general.architecture").ok()?;
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()?
        .parse()
        .ok()
}

type LoadedParts = (Prompter, LlamaContextParams, u32);

fn load_model(config: &ModelConfig) -> Result<LoadedParts, String> {
    let params = LlamaModelParams::default().with_n_gpu_layers(config.n_gpu_layers);
    let prompter = Prompter::load(config, &params)?;
    let model = prompter.model();

    let context_per_sequence = config.context_per_sequence(model.n_ctx_train());
    let threads = config.threads as i32;
    let context_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.n_ctx))
        .with_n_batch(config.batch)
        .with_n_ubatch(config.batch)
        .with_n_seq_max(config.slots)
        // Unified: one pool of cells shared by every slot; admission reserves cells so the
        // pool cannot overflow. Split: each slot owns n_ctx / slots cells.
        .with_kv_unified(config.kv_unified)
        // Sliding-window layers (Gemma 3) keep a window-size cache, as llama.cpp's server
        // does; a full-size one costs memory. llama.cpp overwrites a window's oldest cells
        // only when that cache runs short, so prefix reuse still works while a slot holds
        // the window before the cut (checked per reuse, see `usable_prefix`).
        .with_swa_full(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    Ok((prompter, context_params, context_per_sequence))
}

/// The llama.cpp runner: owns the context and applies what the [`Scheduler`] decides.
struct StepLoop<'m> {
    ctx: LlamaContext<'m>,
    model: &'m LlamaModel,
    batch: LlamaBatch<'static>,
    scheduler: Scheduler<Requester>,
    /// Per seq id: the live sequence's sampler (llama.cpp samplers are not `Send`, so they
    /// are built here at admission rather than carried through the queue).
    samplers: Vec<Option<SeqSampler>>,
    /// Each grammar parsed once on this thread; a sequence gets a copy in its start state.
    grammar_prototypes: HashMap<Grammar, LlamaSampler>,
    /// Given back as requests leave the queue: see [`QueuePlaces`].
    places: Arc<QueuePlaces>,
    metrics: EngineMetrics,
    load: Arc<LoadMeter>,
    /// Fault injection (`fault_step_delay_ms`): a stalled tier for tests and drills.
    step_delay: Duration,
    /// Fault injection (`fault_panic_after_steps`): decode steps left before this thread
    /// panics, to drill a tier going down under traffic.
    panic_in_steps: Option<u64>,
    /// Set by [`ModelThread::stop`].
    stop: Arc<AtomicBool>,
    model_id: String,
    /// Every end-of-generation token, masked out for `ignore_eos` requests.
    eog_tokens: Vec<LlamaToken>,
    /// Made when the first constrained sequence arrives (a pass over the vocabulary).
    first_bytes: Option<Arc<FirstBytes>>,
}

impl StepLoop<'_> {
    fn run(&mut self, queue: &Receiver<Queued>) {
        let mut queue_open = true;
        loop {
            if self.stop_requested() {
                return;
            }
            if self.scheduler.is_idle() {
                if !queue_open {
                    return;
                }
                // Idle: wait for work, every engine handle gone, or a stop request.
                match queue.recv_timeout(STOP_POLL) {
                    Ok(request) => self.scheduler.enqueue(request),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while queue_open {
                match queue.try_recv() {
                    Ok(request) => self.scheduler.enqueue(request),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => queue_open = false,
                }
            }
            self.retire();
            self.admit();
            if !self.scheduler.live().is_empty() {
                self.step();
                self.retire();
            }
            self.publish_load();
        }
    }

    /// One decode call for requests, after the injected stall if any: a stalled tier
    /// looks slow to the load meter, as a real one would.
    fn timed_decode(&mut self) -> Result<(), DecodeError> {
        if let Some(left) = self.panic_in_steps.as_mut() {
            *left -= 1;
            assert!(
                *left > 0,
                "fault injection: fault_panic_after_steps reached"
            );
        }
        self.load.step_running(true);
        // In short naps, so a stop request is not held up by a long injected stall.
        let stall_until = Instant::now() + self.step_delay;
        while !self.stop_requested() {
            let left = stall_until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(STOP_POLL));
        }
        let outcome = self.ctx.decode(&mut self.batch);
        self.load.step_running(false);
        outcome
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Measures prefill and decode before the first request, so TTFT predictions start
    /// from what requests will see: a batched prefill of several short prompts and a few
    /// batched decode steps, as a burst of requests gets. The very first decode runs cold
    /// (weights paged in, buffers allocated) and is not recorded.
    fn warm_up(&mut self) {
        const PROMPT: usize = 32;
        const DECODE_STEPS: usize = 3;
        let slots = self.scheduler.limits().slots.min(4) as SeqId;
        let batch_tokens = self.scheduler.limits().batch_capacity;
        let sequences: Vec<SeqId> = (0..slots)
            .take_while(|&seq| (seq as usize + 1) * PROMPT <= batch_tokens)
            .collect();
        if sequences.is_empty() {
            tracing::warn!(model = %self.model_id, batch_tokens, "batch too small to measure a warm-up prefill");
            return;
        }
        let token = self.model.vocab().bos();
        // One decode call over `positions` of every sequence in `seqs`; its duration.
        let run = |this: &mut Self, seqs: &[SeqId], positions: std::ops::Range<usize>| {
            this.batch.clear();
            let last = positions.end - 1;
            for &seq in seqs {
                for pos in positions.clone() {
                    this.batch
                        .add(token, pos as i32, &[seq], pos == last)
                        .map_err(|e| e.to_string())?;
                }
            }
            let started = Instant::now();
            // Not `timed_decode`: the injected stall models a tier that stalls after
            // start-up, so it is for prediction and the watchdog to discover.
            this.ctx
                .decode(&mut this.batch)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(started.elapsed())
        };
        let clear = |this: &mut Self| {
            for &seq in &sequences {
                this.ctx
                    .clear_kv_cache_seq(Some(seq as u32), None, None)
                    .ok();
            }
        };
        let outcome = (|| {
            run(self, &sequences[..1], 0..PROMPT)?;
            clear(self);
            let prefill = run(self, &sequences, 0..PROMPT)?;
            self.load.record_step(prefill, PROMPT * sequences.len(), 0);
            let mut steps = Vec::with_capacity(DECODE_STEPS);
            for step in 0..DECODE_STEPS {
                let elapsed = run(self, &sequences, PROMPT + step..PROMPT + step + 1)?;
                self.load.record_step(elapsed, 0, sequences.len());
                steps.push(elapsed);
            }
            Ok::<_, String>((prefill, steps))
        })();
        self.batch.clear();
        clear(self);
        match outcome {
            Ok((prefill, steps)) => tracing::debug!(model = %self.model_id,
                sequences = sequences.len(), ?prefill, ?steps, "warm-up measured"),
            Err(err) => tracing::warn!(model = %self.model_id, %err, "warm-up decode failed"),
        }
    }

    fn publish_load(&self) {
        let expected_reply = self.load.expected_completion_tokens();
        let (prefill_s_per_token, step_s) = (self.load.prefill_s_per_token(), self.load.step_s());
        let steps_to_release =
            self.scheduler
                .steps_to_release(expected_reply, prefill_s_per_token, step_s);
        self.metrics
            .free_slots
            .set(self.scheduler.free_slots() as i64);
        self.metrics.kv_cache_usage.set(
            self.scheduler.cells_in_use() as f64
                / f64::from(self.scheduler.limits().total_cells.max(1)),
        );
        self.load.set_occupancy(
            self.scheduler.live().len(),
            self.scheduler.waiting().len(),
            self.scheduler.pending_prompt_tokens(),
            steps_to_release,
        );
    }

    /// Sequences that are over, or whose client went away (it dropped the stream), leave:
    /// their slot frees and their cells are cleared or kept as a prefix.
    fn retire(&mut self) {
        self.places
            .give_back(self.scheduler.drop_waiting(Requester::is_gone));
        // Until nothing leaves: a leader leaving now orphans its forked choices, which
        // must leave too before `admit` can give its slot id to another request.
        loop {
            for orphan in self.scheduler.orphaned_forks() {
                let error =
                    EngineError::Decode("the choice that prefilled the prompt failed".into());
                self.fail(&[Work::Decode { seq: orphan }], error);
            }
            let leaving = self.scheduler.take_leaving(Requester::is_gone);
            if leaving.is_empty() {
                return;
            }
            self.release(leaving);
        }
    }

    /// Frees each leaving sequence's slot and reservation, and clears or keeps its cells.
    fn release(&mut self, leaving: Vec<Sequence<Requester>>) {
        for seq in leaving {
            if !seq.is_over() {
                tracing::debug!(model = %self.model_id, seq_id = seq.seq_id, "client gone, sequence dropped");
            }
            // Read before any clear: the window's oldest position still held.
            let window_start = self.ctx.kv_cache_seq_pos_min(seq.seq_id);
            if let Release::Clear(seq_id) = self.scheduler.release(&seq, window_start) {
                if let Err(err) = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), None, None) {
                    tracing::error!(model = %self.model_id, seq_id, %err, "could not clear KV cells");
                }
            }
            self.samplers[seq.seq_id as usize] = None;
            // A sequence that ended on its own (stop, length) shows how long replies run.
            let completed = (matches!(seq.state, SeqState::Finished(_)) && !seq.payload.is_gone())
                .then_some(seq.generated);
            self.load
                .record_sequence(seq.payload.admitted_at.elapsed(), completed);
            self.metrics.active_sequences.dec();
        }
    }

    /// Gives each newly admitted sequence its cells (clearing a cached prefix past what it
    /// shares), its sampler and its `prefill` span.
    fn admit(&mut self) {
        for admitted in self.scheduler.admit() {
            let seq_id = admitted.seq_id;
            // A request took one queue place, whatever its choices.
            let forked = matches!(
                self.scheduler.live()[admitted.index].state,
                SeqState::Forked { .. }
            );
            if !forked {
                self.places.give_back(1);
            }
            self.metrics.active_sequences.inc();
            if let Some(from) = admitted.clear_from {
                let from = (from > 0).then_some(from);
                if let Err(err) = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), from, None) {
                    tracing::error!(model = %self.model_id, seq_id, %err, "could not clear KV cells");
                    let _ = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), None, None);
                    self.scheduler.forget_reuse(admitted.index);
                }
            }
            let seq = self.scheduler.sequence_mut(admitted.index);
            if seq.cached_prompt_tokens > 0 {
                self.metrics
                    .prefix_cache_tokens
                    .inc_by(seq.cached_prompt_tokens as u64);
            }
            let requester = &mut seq.payload;
            requester.admitted_at = Instant::now();
            requester.queue_time = requester.admitted_at - requester.enqueued_at;
            self.metrics
                .queue_time
                .observe(requester.queue_time.as_secs_f64());
            // Replacing the `queue` span closes it.
            requester.stage_span = tracing::debug_span!(
                parent: &requester.request_span,
                "prefill",
                model = %self.model_id,
                seq_id,
                prompt_tokens = seq.prompt.len(),
                cached_tokens = seq.cached_prompt_tokens,
            );
            let chain = build_sampler(
                self.model,
                &requester.sampling,
                requester.ignore_eos.then_some(&self.eog_tokens),
            );
            let grammar = match &requester.grammar {
                None => None,
                Some(grammar) => {
                    match grammar_sampler(&mut self.grammar_prototypes, self.model, grammar) {
                        Some(rules) => Some(Constraint {
                            rules,
                            first_bytes: first_bytes(
                                &mut self.first_bytes,
                                self.model,
                                &self.model_id,
                            ),
                            decided_by_top: decided_by_top(
                                &requester.sampling,
                                requester.ignore_eos,
                            ),
                            draws_from_all: {
                                let sampling = &requester.sampling;
                                !sampling.is_greedy()
                                    && sampling.top_k == 0
                                    && sampling.top_p >= 1.0
                            },
                            judges_lead_bytes: judges_lead_bytes(grammar),
                            narrows: requester.sampling.logit_bias.len() <= NARROWS_WITH_BIASES,
                        }),
                        None => {
                            // `submit` loaded this grammar already: not the client's fault.
                            let error =
                                EngineError::Decode("the reply's grammar did not load".into());
                            self.fail(
                                &[Work::Decode {
                                    seq: admitted.index,
                                }],
                                error,
                            );
                            continue;
                        }
                    }
                }
            };
            let sampling = &requester.sampling;
            let penalties = sampling.presence_penalty != 0.0 || sampling.frequency_penalty != 0.0;
            self.samplers[seq_id as usize] = Some(SeqSampler::new(chain, grammar, penalties));
        }
    }

    /// One decode call over every live sequence, then sampling for each that produced logits.
    fn step(&mut self) {
        let mut work = self.scheduler.plan();
        let logits_at = loop {
            if work.is_empty() {
                return;
            }
            let logits_at = match self.fill_batch(&work) {
                Ok(logits_at) => logits_at,
                Err(err) => {
                    // The planner sizes work to the batch, so this is a bug, not load.
                    self.fail(&work, EngineError::Decode(format!("batch overflow: {err}")));
                    return;
                }
            };
            let started = Instant::now();
            match self.timed_decode() {
                Ok(()) => {
                    let (mut prompt_tokens, mut decode_tokens) = (0, 0);
                    for w in &work {
                        match w {
                            Work::Prompt { tokens, .. } => prompt_tokens += *tokens,
                            Work::Decode { .. } => decode_tokens += 1,
                        }
                    }
                    self.load
                        .record_step(started.elapsed(), prompt_tokens, decode_tokens);
                    break logits_at;
                }
                Err(DecodeError::NoKvCacheSlot) => {
                    // Reservations make this rare (cells can still run short, e.g. when
                    // llama.cpp pads). Retry smaller.
                    match self.scheduler.shrink_for_kv(&mut work) {
                        Some(KvShrink::PromptsDeferred) => {
                            tracing::warn!(model = %self.model_id, "KV cache full: deferring prompt chunks");
                        }
                        Some(KvShrink::EndNewest(newest)) => {
                            tracing::warn!(model = %self.model_id, "KV cache full: ending the newest sequence");
                            self.finish(newest, FinishReason::Length);
                        }
                        Some(KvShrink::FailNewest(newest)) => {
                            tracing::warn!(model = %self.model_id, "KV cache full with nothing generating: failing the newest prompt");
                            let error = EngineError::Decode(
                                "the KV cache has no room for this prompt now".into(),
                            );
                            self.fail(&[Work::Decode { seq: newest }], error);
                            // Its cells free only when it retires after this step; a
                            // retry now would find no room and fail the next prompt too.
                            return;
                        }
                        None => return,
                    }
                }
                Err(err) => {
                    tracing::error!(model = %self.model_id, %err, "decode failed");
                    self.fail(&work, EngineError::Decode(err.to_string()));
                    return;
                }
            }
        };

        let sequences_in_step = work.len() as i64;
        self.metrics.batch_size.observe(sequences_in_step as f64);
        if sequences_in_step > self.metrics.batch_sequences_max.get() {
            self.metrics.batch_sequences_max.set(sequences_in_step);
        }
        self.scheduler.decoded(&work);
        for (w, batch_index) in work.iter().zip(logits_at) {
            let Some(batch_index) = batch_index else {
                continue;
            };
            let seq_id = self.scheduler.live()[w.seq()].seq_id;
            match self.samplers[seq_id as usize].as_mut() {
                Some(sampler) => match sampler.sample(&self.ctx, batch_index) {
                    Some(token) => {
                        // A prompt just completed: its other choices start from it.
                        if matches!(w, Work::Prompt { .. }) {
                            self.fork_choices(w.seq(), batch_index);
                        }
                        self.record_logprobs(w.seq(), batch_index, token);
                        self.accept_token(w.seq(), token);
                    }
                    None => self.fail(
                        &[*w],
                        EngineError::Decode("the reply's grammar allows no next token".into()),
                    ),
                },
                // Admission builds every sampler; without one, the sequence must not go on
                // (its pending token was just decoded and would be decoded again).
                None => self.fail(
                    &[*w],
                    EngineError::Decode("the sequence has no sampler".into()),
                ),
            }
        }
    }

    /// The other choices of the request whose prompt live sequence `leader` just
    /// prefilled: each gets a copy of its cells and samples its own first token from the
    /// same logits (at `batch_index`), so the prompt is prefilled once for all of them.
    fn fork_choices(&mut self, leader: usize, batch_index: i32) {
        let leader_id = self.scheduler.live()[leader].seq_id;
        for choice in self.scheduler.fork(leader) {
            let seq_id = self.scheduler.live()[choice].seq_id;
            // With a split KV cache this copies the leader's whole slot (llama.cpp
            // supports only full copies across slots), done before the next decode.
            if let Err(err) = self.ctx.copy_kv_cache_seq(leader_id, seq_id, None, None) {
                let error =
                    EngineError::Decode(format!("could not copy the prompt's cells: {err}"));
                self.fail(&[Work::Decode { seq: choice }], error);
                continue;
            }
            let token = self.samplers[seq_id as usize]
                .as_mut()
                .and_then(|sampler| sampler.sample(&self.ctx, batch_index));
            match token {
                Some(token) => {
                    self.record_logprobs(choice, batch_index, token);
                    self.accept_token(choice, token);
                }
                None => {
                    let error = EngineError::Decode("no token could be sampled".into());
                    self.fail(&[Work::Decode { seq: choice }], error);
                }
            }
        }
    }

    /// Writes `work` into the batch; returns, per work item, the batch index whose logits
    /// it will sample from (only decodes and the chunk that completes a prompt have one).
    fn fill_batch(&mut self, work: &[Work]) -> Result<Vec<Option<i32>>, BatchAddError> {
        self.batch.clear();
        let mut logits_at = Vec::with_capacity(work.len());
        for w in work {
            let seq = &self.scheduler.live()[w.seq()];
            match (*w, seq.state) {
                (Work::Decode { .. }, SeqState::Generating { pending }) => {
                    logits_at.push(Some(self.batch.n_tokens()));
                    self.batch.add(pending, seq.n_past, &[seq.seq_id], true)?;
                }
                (Work::Prompt { tokens, .. }, SeqState::Prefilling { done }) => {
                    let completes = done + tokens == seq.prompt.len();
                    let mut index = None;
                    for (offset, &token) in seq.prompt[done..done + tokens].iter().enumerate() {
                        let wants_logits = completes && offset + 1 == tokens;
                        if wants_logits {
                            index = Some(self.batch.n_tokens());
                        }
                        self.batch.add(
                            token,
                            seq.n_past + offset as i32,
                            &[seq.seq_id],
                            wants_logits,
                        )?;
                    }
                    logits_at.push(index);
                }
                // The plan is made from these states in the same step.
                _ => logits_at.push(None),
            }
        }
        Ok(logits_at)
    }

    /// For a request that asked for log probabilities: the sampled token's and its
    /// likeliest alternatives' (see [`super::logprobs`] for which distribution).
    fn record_logprobs(&mut self, index: usize, batch_index: i32, token: LlamaToken) {
        let model = self.model;
        let requester = &mut self.scheduler.sequence_mut(index).payload;
        let Some(top) = requester.logprobs else {
            return;
        };
        // The end of the reply is not a token of its content (OpenAI reports none for it).
        if model.vocab().is_eog(token) {
            return;
        }
        let logits = self.ctx.get_logits_ith(batch_index);
        let (logprob, alternatives) = log_softmax_top(logits, token.0 as usize, top as usize);
        // As the content renders them (control tokens as nothing), so the entries'
        // bytes spell the content.
        let described = |id: LlamaToken| {
            let bytes = model.vocab().token_to_piece(id, false, None);
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (text, bytes) = described(token);
        let top_logprobs = alternatives
            .into_iter()
            .map(|(id, logprob)| {
                let (token, bytes) = described(LlamaToken(id as i32));
                TopLogprob {
                    token,
                    logprob,
                    bytes,
                }
            })
            .collect();
        requester.pending_logprobs.push(TokenLogprob {
            token: text,
            logprob,
            bytes,
            top_logprobs,
        });
    }

    /// Turns one sampled token into text for the client and decides whether the sequence ends.
    fn accept_token(&mut self, index: usize, token: LlamaToken) {
        // A copy of the reference, so the vocabulary borrows the model, not `self`.
        let model = self.model;
        let vocab = model.vocab();
        let seq = self.scheduler.sequence_mut(index);
        let requester = &mut seq.payload;
        if requester.first_token_at.is_none() {
            let now = Instant::now();
            requester.first_token_at = Some(now);
            self.metrics
                .prefill_time
                .observe((now - requester.admitted_at).as_secs_f64());
            requester.stage_span = tracing::debug_span!(
                parent: &requester.request_span,
                "decode",
                model = %self.model_id,
                seq_id = seq.seq_id,
                completion_tokens = tracing::field::Empty,
            );
        }
        if vocab.is_eog(token) {
            self.finish(index, FinishReason::Stop);
            return;
        }
        let piece = vocab.token_to_piece(token, false, None);
        let text = requester.utf8.push(&piece);
        let matched = requester.stops.push(&text);
        requester.send_text(matched.emit);
        let stopped = matched.stopped;
        if stopped {
            // Whatever was held back belongs to the stop string or comes after it.
            requester.stops = StopMatcher::default();
            requester.utf8 = Utf8Decoder::default();
            requester.pending_logprobs.clear();
        }
        self.scheduler.sampled(index, token);
        let seq = &self.scheduler.live()[index];
        if stopped {
            self.finish(index, FinishReason::Stop);
        } else if seq.generated >= seq.max_new_tokens {
            self.finish(index, FinishReason::Length);
        }
    }

    /// Sends the tail of the text and the final event; the sequence leaves at the end of the step.
    fn finish(&mut self, index: usize, reason: FinishReason) {
        let seq = self.scheduler.sequence_mut(index);
        if seq.is_over() {
            return;
        }
        let requester = &mut seq.payload;
        let tail = requester.utf8.finish();
        let mut text = requester.stops.push(&tail).emit;
        text.push_str(&requester.stops.finish());
        requester.send_text(text);
        let now = Instant::now();
        // A sequence ended before its first token (context full) has no decode stage.
        let first_token_at = requester.first_token_at.unwrap_or(now);
        requester
            .stage_span
            .record("completion_tokens", seq.generated);
        let _ = requester.events.send(TokenEvent::Finished {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: seq.prompt.len() as u32,
                completion_tokens: seq.generated,
                cached_prompt_tokens: Some(seq.cached_prompt_tokens as u32),
            },
            timings: StageTimings {
                queue: requester.queue_time,
                prefill: first_token_at.saturating_duration_since(requester.admitted_at),
                decode: now.saturating_duration_since(first_token_at),
            },
        });
        self.scheduler.finish(index, reason);
    }

    /// Ends every sequence in `work` with an error; they leave at the end of the step.
    fn fail(&mut self, work: &[Work], error: EngineError) {
        for w in work {
            let _ = self.scheduler.live()[w.seq()]
                .payload
                .events
                .send(TokenEvent::Failed(error.clone()));
        }
        self.scheduler.fail(work);
    }
}

/// A copy, in its start state, of `grammar` parsed for `model` (parsed on first use).
fn grammar_sampler(
    prototypes: &mut HashMap<Grammar, LlamaSampler>,
    model: &LlamaModel,
    grammar: &Grammar,
) -> Option<LlamaSampler> {
    if let Some(prototype) = prototypes.get(grammar) {
        return Some(prototype.clone());
    }
    let prototype = LlamaSampler::grammar(model, grammar, "root").ok()?;
    // Bounded like the schema cache that feeds it.
    if prototypes.len() >= KEPT_PROTOTYPES {
        prototypes.clear();
    }
    prototypes.insert(grammar.clone(), prototype.clone());
    Some(prototype)
}

/// How many of the highest logits decide `build_sampler`'s pick (see
/// [`Constraint::decided_by_top`]): none when biases or penalties come before the cut.
fn decided_by_top(params: &SamplingParams, ignore_eos: bool) -> Option<usize> {
    let reorders = !params.logit_bias.is_empty()
        || ignore_eos
        || params.presence_penalty != 0.0
        || params.frequency_penalty != 0.0;
    if reorders {
        None
    } else if params.is_greedy() {
        Some(1)
    } else {
        usize::try_from(params.top_k).ok().filter(|&k| k > 0)
    }
}

/// The model's first bytes, read on first use.
fn first_bytes(
    kept: &mut Option<Arc<FirstBytes>>,
    model: &LlamaModel,
    model_id: &str,
) -> Arc<FirstBytes> {
    Arc::clone(kept.get_or_insert_with(|| {
        let started = Instant::now();
        let first_bytes = Arc::new(FirstBytes::of(model));
        tracing::info!(model = %model_id, took_ms = started.elapsed().as_millis() as u64,
            "read the vocabulary's first bytes for constrained sampling");
        first_bytes
    }))
}

/// Parsed grammars kept per model thread.
const KEPT_PROTOTYPES: usize = 64;

/// llama.cpp's default order, cheapest cut first: biases → penalties → top_k → top_p → temperature → draw.
/// Temperature 0 is greedy, with no randomness at all.
fn build_sampler(
    model: &LlamaModel,
    params: &SamplingParams,
    banned: Option<&[LlamaToken]>,
) -> LlamaSampler {
    let mut chain = Vec::new();
    // The request's biases, then end-of-generation banned for `ignore_eos` (a ban wins).
    let biases: Vec<LlamaLogitBias> = params
        .logit_bias
        .iter()
        .map(|&(token, bias)| LlamaLogitBias::new(LlamaToken(token), bias))
        .chain(
            banned
                .unwrap_or_default()
                .iter()
                .map(|&token| LlamaLogitBias::new(token, f32::NEG_INFINITY)),
        )
        .collect();
    if !biases.is_empty() {
        chain.push(LlamaSampler::logit_bias(model.n_vocab(), &biases));
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        // The last 64 tokens, as llama.cpp's server counts them; repeat penalty off (1.0).
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            64,
            1.0,
            params.frequency_penalty,
            params.presence_penalty,
        ));
    }
    if params.is_greedy() {
        chain.push(LlamaSampler::greedy());
    } else {
        if params.top_k > 0 {
            chain.push(LlamaSampler::top_k(params.top_k as i32));
        }
        if params.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(params.top_p, 1));
        }
        chain.push(LlamaSampler::temp(params.temperature));
        // u32::MAX asks llama.cpp for a random seed.
        chain.push(LlamaSampler::dist(params.seed.unwrap_or(u32::MAX)));
    }
    LlamaSampler::chain_simple(chain)
}
