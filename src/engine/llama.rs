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

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
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
use tokio::sync::{mpsc, oneshot};

use super::load::{LoadMeter, LoadSnapshot};
use super::prompt::{backend, Prompter};
use super::schedule;
use super::text::{StopMatcher, Utf8Decoder};
use super::{
    ChatMessage, Engine, EngineError, FinishReason, GenerationRequest, ModelInfo, SamplingParams,
    StageTimings, TokenEvent, TokenStream, Usage,
};
use crate::config::ModelConfig;
use crate::metrics::EngineMetrics;

/// What exists once the model thread has loaded the model.
struct Loaded {
    prompter: Arc<Prompter>,
    /// The most positions one sequence may use: `n_ctx`, capped by the training context.
    context_per_sequence: u32,
}

/// A request that passed every check and waits for a slot.
struct QueuedRequest {
    prompt: Vec<LlamaToken>,
    max_new_tokens: u32,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
    events: mpsc::UnboundedSender<TokenEvent>,
    enqueued_at: Instant,
    /// The request's span, parent of the stage spans.
    request_span: tracing::Span,
    /// Open from `submit` until a slot is found.
    queue_span: tracing::Span,
}

impl QueuedRequest {
    /// KV cells this request may need at most: it is admitted only when they are free.
    fn reservation(&self) -> u32 {
        self.prompt.len() as u32 + self.max_new_tokens
    }
}

pub struct LlamaEngine {
    info: ModelInfo,
    max_tokens_default: u32,
    queue_capacity: usize,
    /// Set once by the model thread after a successful load.
    loaded: Arc<OnceLock<Loaded>>,
    /// Set by the model thread if it fails to load or stops.
    stopped: Arc<OnceLock<String>>,
    /// Bounded so a burst cannot grow memory without limit; the model thread owns the
    /// receiving end and drains it between steps.
    queue: SyncSender<QueuedRequest>,
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
        let engine = Arc::new(Self {
            info: ModelInfo {
                id: config.id.clone(),
                tier: config.tier.clone(),
            },
            max_tokens_default: config.max_tokens_default,
            queue_capacity: config.queue_capacity,
            loaded: loaded.clone(),
            stopped: stopped.clone(),
            queue: queue_tx,
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
                    ready: ready_tx,
                    stop: stop_flag,
                };
                let outcome = model_thread(config, &loaded, channels, metrics, load);
                let reason = match outcome {
                    Ok(()) => "the model thread stopped".to_owned(),
                    Err(reason) => {
                        tracing::error!(model = %id, %reason, "model thread failed");
                        reason
                    }
                };
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

    fn is_ready(&self) -> bool {
        self.loaded().is_ok()
    }

    fn load(&self) -> LoadSnapshot {
        self.load.snapshot()
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        self.loaded()?.prompter.count(messages)
    }

    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, EngineError> {
        let loaded = self.loaded()?;
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

        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let queue_span = tracing::debug_span!(
            parent: &request.span,
            "queue",
            model = %self.info.id,
            prompt_tokens,
        );
        let queued = QueuedRequest {
            prompt,
            max_new_tokens,
            sampling: request.sampling,
            stop: request.stop,
            ignore_eos: request.ignore_eos,
            events: events_tx,
            enqueued_at: Instant::now(),
            request_span: request.span,
            queue_span,
        };
        // Count before sending: the model thread decrements on admission, which may come
        // before try_send returns.
        self.metrics.waiting_requests.inc();
        self.load.queued(prompt_tokens);
        match self.queue.try_send(queued) {
            Ok(()) => Ok(TokenStream::new(prompt_tokens, events_rx)),
            Err(err) => {
                self.metrics.waiting_requests.dec();
                Err(match err {
                    TrySendError::Full(_) => EngineError::QueueFull {
                        model: self.info.id.clone(),
                        capacity: self.queue_capacity,
                    },
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
    queue: Receiver<QueuedRequest>,
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
    let ThreadChannels { queue, ready, stop } = channels;
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
    // Reusing a prefix truncates a slot's cells to it. A sliding-window cache may no longer
    // hold the window before the cut, and a unified pool would keep cells other slots need.
    let sliding_window = model
        .meta_val_str("general.architecture")
        .ok()
        .and_then(|arch| {
            model
                .meta_val_str(&format!("{arch}.attention.sliding_window"))
                .ok()
        });
    let prefix_cache = config.prefix_cache && !config.kv_unified && sliding_window.is_none();
    if config.prefix_cache && !prefix_cache {
        tracing::info!(
            model = %config.id,
            kv_unified = config.kv_unified,
            ?sliding_window,
            "prefix cache off: needs a split KV cache and a model without sliding-window attention"
        );
    }
    let total_cells = ctx.n_ctx();
    // llama.cpp clamps n_batch to n_ctx; plan with what it actually allotted.
    let batch_capacity = ctx.n_batch() as usize;
    let mut step_loop = StepLoop {
        ctx,
        model: &model,
        batch: LlamaBatch::new(batch_capacity, 1),
        batch_capacity,
        prefill_chunk: config.prefill_chunk as usize,
        total_cells,
        reserved_cells: 0,
        free_seq_ids: (0..config.slots as i32).collect(),
        prefix_cache,
        cached_prefix: vec![Vec::new(); config.slots as usize],
        waiting: VecDeque::new(),
        live: Vec::new(),
        metrics,
        load,
        step_delay: Duration::from_millis(config.fault_step_delay_ms),
        stop,
        model_id: config.id.clone(),
        eog_tokens: {
            let vocab = model.vocab();
            vocab.tokens().filter(|&t| vocab.is_eog(t)).collect()
        },
    };
    let _ = loaded_slot.set(Loaded {
        prompter: Arc::new(prompter),
        context_per_sequence,
    });
    step_loop.warm_up();
    let _ = ready.send(Ok(()));
    step_loop.run(&queue);
    Ok(())
}

type LoadedParts = (Prompter, LlamaContextParams, u32);

fn load_model(config: &ModelConfig) -> Result<LoadedParts, String> {
    let params = LlamaModelParams::default().with_n_gpu_layers(config.n_gpu_layers);
    let prompter = Prompter::load(config, &params)?;
    let model = prompter.model();

    let context_per_sequence = if config.kv_unified {
        config.n_ctx
    } else {
        config.n_ctx / config.slots
    }
    .min(model.n_ctx_train());
    let threads = config.threads as i32;
    let context_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.n_ctx))
        .with_n_batch(config.batch)
        .with_n_ubatch(config.batch)
        .with_n_seq_max(config.slots)
        // Unified: one pool of cells shared by every slot; admission reserves cells so the
        // pool cannot overflow. Split: each slot owns n_ctx / slots cells.
        .with_kv_unified(config.kv_unified)
        // Sliding-window layers (Gemma 3) keep only their window, as llama.cpp's server
        // does; the library default keeps full-size caches, which only costs memory.
        .with_swa_full(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    Ok((prompter, context_params, context_per_sequence))
}

/// One admitted request holding a slot (a llama.cpp sequence id) and KV cells.
struct Sequence {
    seq_id: i32,
    admitted_at: Instant,
    queue_time: Duration,
    first_token_at: Option<Instant>,
    request_span: tracing::Span,
    /// `prefill` until the first token, then `decode`.
    stage_span: tracing::Span,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens already in the KV cache.
    prompt_done: usize,
    /// Next free position of this sequence.
    n_past: i32,
    /// Sampled, sent, and waiting to be decoded in the next step.
    pending_token: Option<LlamaToken>,
    generated: u32,
    max_new_tokens: u32,
    reservation: u32,
    sampler: LlamaSampler,
    utf8: Utf8Decoder,
    stops: StopMatcher,
    events: mpsc::UnboundedSender<TokenEvent>,
    finished: Option<FinishReason>,
    /// Generated tokens already decoded into the KV cache, in order.
    decoded: Vec<LlamaToken>,
    /// False after a failed decode: what the cells hold is then unknown.
    kv_trusted: bool,
    /// Prompt tokens reused from the slot's cells at admission.
    cached_prompt_tokens: usize,
}

impl Sequence {
    /// The tokens whose KV cells this sequence holds, positions 0.. in order; `None` when
    /// that is not known for sure.
    fn tokens_in_kv(&self) -> Option<Vec<LlamaToken>> {
        let held = self.prompt_done + self.decoded.len();
        if !self.kv_trusted || held != self.n_past as usize {
            return None;
        }
        let mut tokens = self.prompt[..self.prompt_done].to_vec();
        tokens.extend_from_slice(&self.decoded);
        Some(tokens)
    }

    fn is_prefilling(&self) -> bool {
        self.prompt_done < self.prompt.len()
    }

    /// Decode steps until this sequence is expected to leave: the rest of its prompt (in
    /// step-equivalents), then the tokens an average reply still has to come, never more
    /// than its `max_tokens` allows. Until a reply has finished, the cap is the estimate.
    fn expected_steps_left(
        &self,
        expected_reply: Option<f64>,
        prefill_s_per_token: f64,
        step_s: f64,
    ) -> u32 {
        let cap_left = self.max_new_tokens.saturating_sub(self.generated);
        let reply_left = match expected_reply {
            Some(tokens) => {
                ((tokens - f64::from(self.generated)).ceil().max(1.0) as u32).min(cap_left)
            }
            None => cap_left,
        };
        let prompt_left = (self.prompt.len() - self.prompt_done) as f64;
        let prefill_steps = if step_s > 0.0 {
            (prompt_left * prefill_s_per_token / step_s).ceil() as u32
        } else {
            0
        };
        prefill_steps.saturating_add(reply_left)
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            // A closed receiver is noticed by the cancellation check before the next step.
            let _ = self.events.send(TokenEvent::Text(text));
        }
    }
}

/// What one sequence contributes to the next decode call.
#[derive(Debug, Clone, Copy)]
enum Work {
    Decode { seq: usize },
    Prompt { seq: usize, tokens: usize },
}

impl Work {
    fn seq(self) -> usize {
        match self {
            Work::Decode { seq } | Work::Prompt { seq, .. } => seq,
        }
    }
}

struct StepLoop<'m> {
    ctx: LlamaContext<'m>,
    model: &'m LlamaModel,
    batch: LlamaBatch<'static>,
    batch_capacity: usize,
    /// See [`schedule::prompt_chunks`].
    prefill_chunk: usize,
    total_cells: u32,
    /// Sum of the live sequences' reservations.
    reserved_cells: u32,
    /// Ordered, so `pop_first` hands out the lowest free id: see [`Self::plan`].
    free_seq_ids: BTreeSet<i32>,
    /// Reuse a free slot's KV cells for a new prompt that starts with the same tokens.
    prefix_cache: bool,
    /// Per seq id: the tokens a free slot's cells still hold (empty while in use).
    cached_prefix: Vec<Vec<LlamaToken>>,
    /// Taken off the queue, not yet admitted (no slot or not enough free cells).
    waiting: VecDeque<QueuedRequest>,
    /// Admitted sequences, oldest first.
    live: Vec<Sequence>,
    metrics: EngineMetrics,
    load: Arc<LoadMeter>,
    /// Fault injection (`fault_step_delay_ms`): a stalled tier for tests and drills.
    step_delay: Duration,
    /// Set by [`ModelThread::stop`].
    stop: Arc<AtomicBool>,
    model_id: String,
    /// Every end-of-generation token, masked out for `ignore_eos` requests.
    eog_tokens: Vec<LlamaToken>,
}

impl StepLoop<'_> {
    fn run(&mut self, queue: &Receiver<QueuedRequest>) {
        let mut queue_open = true;
        loop {
            if self.stop_requested() {
                return;
            }
            if self.live.is_empty() && self.waiting.is_empty() {
                if !queue_open {
                    return;
                }
                // Idle: wait for work, every engine handle gone, or a stop request.
                match queue.recv_timeout(STOP_POLL) {
                    Ok(request) => self.waiting.push_back(request),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while queue_open {
                match queue.try_recv() {
                    Ok(request) => self.waiting.push_back(request),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => queue_open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            if !self.live.is_empty() {
                self.step();
                self.retire_finished();
            }
            self.publish_load();
        }
    }

    /// One decode call for requests, after the injected stall if any: a stalled tier
    /// looks slow to the load meter, as a real one would.
    fn timed_decode(&mut self) -> Result<(), DecodeError> {
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

    /// Measures a short prefill and one decode step before the first request, so TTFT
    /// predictions start from this machine's speed rather than from nothing.
    fn warm_up(&mut self) {
        const PROMPT: usize = 32;
        let Some(seq_id) = self.free_seq_ids.first().copied() else {
            return;
        };
        let token = self.model.vocab().bos();
        let run = |this: &mut Self, positions: std::ops::Range<usize>| {
            this.batch.clear();
            let last = positions.end - 1;
            for pos in positions.clone() {
                this.batch
                    .add(token, pos as i32, &[seq_id], pos == last)
                    .map_err(|e| e.to_string())?;
            }
            let started = Instant::now();
            // Not `timed_decode`: the injected stall models a tier that stalls after
            // start-up, so it is for prediction and the watchdog to discover.
            this.ctx
                .decode(&mut this.batch)
                .map_err(|e| e.to_string())?;
            let elapsed = started.elapsed();
            Ok::<_, String>(elapsed)
        };
        let outcome = run(self, 0..PROMPT).and_then(|prefill| {
            let step = run(self, PROMPT..PROMPT + 1)?;
            Ok((prefill, step))
        });
        self.batch.clear();
        self.ctx
            .clear_kv_cache_seq(Some(seq_id as u32), None, None)
            .ok();
        match outcome {
            Ok((prefill, step)) => {
                self.load.record_step(prefill, PROMPT, 0);
                self.load.record_step(step, 0, 1);
                tracing::debug!(model = %self.model_id, ?prefill, ?step, "warm-up measured");
            }
            Err(err) => tracing::warn!(model = %self.model_id, %err, "warm-up decode failed"),
        }
    }

    fn publish_load(&self) {
        let queued: usize = self.waiting.iter().map(|r| r.prompt.len()).sum();
        let prefilling: usize = self
            .live
            .iter()
            .map(|s| s.prompt.len() - s.prompt_done)
            .sum();
        let expected_reply = self.load.expected_completion_tokens();
        let (prefill_s_per_token, step_s) = (self.load.prefill_s_per_token(), self.load.step_s());
        let mut steps_to_release: Vec<u32> = self
            .live
            .iter()
            .map(|seq| seq.expected_steps_left(expected_reply, prefill_s_per_token, step_s))
            .collect();
        steps_to_release.sort_unstable();
        self.metrics.free_slots.set(self.free_seq_ids.len() as i64);
        let cells_in_use: i64 = self.live.iter().map(|s| i64::from(s.n_past)).sum();
        self.metrics
            .kv_cache_usage
            .set(cells_in_use as f64 / f64::from(self.total_cells.max(1)));
        self.load.set_occupancy(
            self.live.len(),
            self.waiting.len(),
            queued + prefilling,
            steps_to_release,
        );
    }

    /// Sequences whose receiver is gone (client disconnected) leave before the next step.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|request| !request.events.is_closed());
        for _ in self.waiting.len()..before {
            self.metrics.waiting_requests.dec();
        }
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i].events.is_closed() {
                let seq = self.live.remove(i);
                tracing::debug!(model = %self.model_id, seq_id = seq.seq_id, "client gone, sequence dropped");
                self.release(seq);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        let admitted = schedule::admit_count(
            self.waiting.iter().map(QueuedRequest::reservation),
            self.free_seq_ids.len(),
            self.total_cells - self.reserved_cells,
        );
        for _ in 0..admitted {
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            let Some((seq_id, reused)) = self.take_slot(&request.prompt) else {
                self.waiting.push_front(request);
                break;
            };
            self.metrics.waiting_requests.dec();
            self.metrics.active_sequences.inc();
            let reservation = request.reservation();
            self.reserved_cells += reservation;
            let admitted_at = Instant::now();
            let queue_time = admitted_at - request.enqueued_at;
            self.metrics.queue_time.observe(queue_time.as_secs_f64());
            drop(request.queue_span);
            let stage_span = tracing::debug_span!(
                parent: &request.request_span,
                "prefill",
                model = %self.model_id,
                seq_id,
                prompt_tokens = request.prompt.len(),
                cached_tokens = reused,
            );
            self.live.push(Sequence {
                seq_id,
                admitted_at,
                queue_time,
                first_token_at: None,
                request_span: request.request_span,
                stage_span,
                prompt: request.prompt,
                prompt_done: reused,
                n_past: reused as i32,
                pending_token: None,
                generated: 0,
                max_new_tokens: request.max_new_tokens,
                reservation,
                sampler: build_sampler(
                    self.model,
                    &request.sampling,
                    request.ignore_eos.then_some(&self.eog_tokens),
                ),
                utf8: Utf8Decoder::default(),
                stops: StopMatcher::new(request.stop),
                events: request.events,
                finished: None,
                decoded: Vec::new(),
                kv_trusted: true,
                cached_prompt_tokens: reused,
            });
        }
    }

    /// Takes a free slot for `prompt`; returns it and how many prompt tokens its cells
    /// already hold (at least one token is always left to prefill: its logits give the
    /// first sampled token). The cells past the shared prefix are cleared.
    fn take_slot(&mut self, prompt: &[LlamaToken]) -> Option<(i32, usize)> {
        if !self.prefix_cache {
            return Some((self.free_seq_ids.pop_first()?, 0));
        }
        let free: Vec<(i32, usize)> = self
            .free_seq_ids
            .iter()
            .map(|&id| {
                let cached = &self.cached_prefix[id as usize];
                (id, schedule::common_prefix_len(cached, prompt))
            })
            .collect();
        let (seq_id, shared) = schedule::pick_slot(&free)?;
        self.free_seq_ids.remove(&seq_id);
        let reused = shared.min(prompt.len().saturating_sub(1));
        let cached = std::mem::take(&mut self.cached_prefix[seq_id as usize]);
        // Cells of a slot with nothing cached were cleared when it was released.
        if reused < cached.len() {
            let from = (reused > 0).then_some(reused as u32);
            if let Err(err) = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), from, None) {
                tracing::error!(model = %self.model_id, seq_id, %err, "could not clear KV cells");
                let _ = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), None, None);
                return Some((seq_id, 0));
            }
        }
        if reused > 0 {
            self.metrics.prefix_cache_tokens.inc_by(reused as u64);
        }
        Some((seq_id, reused))
    }

    /// One decode call over every live sequence, then sampling for each that produced logits.
    fn step(&mut self) {
        let mut work = self.plan();
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
                    // llama.cpp pads). Retry smaller: first without prompt chunks, then
                    // by ending the newest sequence, which frees its cells.
                    if work.iter().any(|w| matches!(w, Work::Prompt { .. })) {
                        tracing::warn!(model = %self.model_id, "KV cache full: deferring prompt chunks");
                        work.retain(|w| matches!(w, Work::Decode { .. }));
                    } else if let Some(newest) = work.iter().map(|w| w.seq()).max() {
                        // `live` is in admission order, so the largest index is the newest.
                        tracing::warn!(model = %self.model_id, "KV cache full: ending the newest sequence");
                        work.retain(|w| w.seq() != newest);
                        self.finish(newest, FinishReason::Length);
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
        for w in &work {
            let seq = &mut self.live[w.seq()];
            match *w {
                Work::Decode { .. } => {
                    if let Some(token) = seq.pending_token.take() {
                        seq.decoded.push(token);
                    }
                    seq.n_past += 1;
                }
                Work::Prompt { tokens, .. } => {
                    seq.prompt_done += tokens;
                    seq.n_past += tokens as i32;
                }
            }
        }
        for (w, batch_index) in work.iter().zip(logits_at) {
            if let Some(batch_index) = batch_index {
                let token = self.live[w.seq()].sampler.sample(&self.ctx, batch_index);
                self.accept_token(w.seq(), token);
            }
        }
    }

    /// Decode tokens get the batch budget first, then prompt chunks in admission order;
    /// the batch itself is written in seq-id order.
    fn plan(&self) -> Vec<Work> {
        let mut work: Vec<Work> = self
            .live
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pending_token.is_some() && s.finished.is_none())
            .map(|(seq, _)| Work::Decode { seq })
            // Only when n_ctx clamps the batch below `slots`; the rest decode next step.
            .take(self.batch_capacity)
            .collect();
        let prefilling: Vec<usize> = (0..self.live.len())
            .filter(|&i| self.live[i].is_prefilling() && self.live[i].finished.is_none())
            .collect();
        let remaining: Vec<usize> = prefilling
            .iter()
            .map(|&i| self.live[i].prompt.len() - self.live[i].prompt_done)
            .collect();
        let chunks = schedule::prompt_chunks(
            self.batch_capacity,
            work.len(),
            self.prefill_chunk,
            &remaining,
        );
        work.extend(
            prefilling
                .into_iter()
                .zip(chunks)
                .filter(|&(_, tokens)| tokens > 0)
                .map(|(seq, tokens)| Work::Prompt { seq, tokens }),
        );
        // With a split KV cache llama.cpp cuts a batch into micro-batches of sequences whose
        // ids run consecutively in batch order (`split_equal(.., sequential = true)`); each
        // micro-batch is a full pass over the weights. Writing the batch in seq-id order,
        // with the lowest free ids handed out first, keeps a step to one pass.
        work.sort_by_key(|w| self.live[w.seq()].seq_id);
        work
    }

    /// Writes `work` into the batch; returns, per work item, the batch index whose logits
    /// it will sample from (only decodes and the chunk that completes a prompt have one).
    fn fill_batch(&mut self, work: &[Work]) -> Result<Vec<Option<i32>>, BatchAddError> {
        self.batch.clear();
        let mut logits_at = Vec::with_capacity(work.len());
        for w in work {
            let seq = &self.live[w.seq()];
            match *w {
                Work::Decode { .. } => {
                    let index = self.batch.n_tokens();
                    if let Some(token) = seq.pending_token {
                        self.batch.add(token, seq.n_past, &[seq.seq_id], true)?;
                    }
                    logits_at.push(Some(index));
                }
                Work::Prompt { tokens, .. } => {
                    let start = seq.prompt_done;
                    let completes = start + tokens == seq.prompt.len();
                    let mut index = None;
                    for (offset, &token) in seq.prompt[start..start + tokens].iter().enumerate() {
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
            }
        }
        Ok(logits_at)
    }

    /// Turns one sampled token into text for the client and decides whether the sequence ends.
    fn accept_token(&mut self, index: usize, token: LlamaToken) {
        let model = self.model;
        let vocab = model.vocab();
        let seq = &mut self.live[index];
        if seq.first_token_at.is_none() {
            let now = Instant::now();
            seq.first_token_at = Some(now);
            self.metrics
                .prefill_time
                .observe((now - seq.admitted_at).as_secs_f64());
            seq.stage_span = tracing::debug_span!(
                parent: &seq.request_span,
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
        seq.generated += 1;
        let piece = vocab.token_to_piece(token, false, None);
        let text = seq.utf8.push(&piece);
        let matched = seq.stops.push(&text);
        seq.send_text(matched.emit);
        if matched.stopped {
            // Whatever was held back belongs to the stop string or comes after it.
            seq.stops = StopMatcher::default();
            seq.utf8 = Utf8Decoder::default();
            self.finish(index, FinishReason::Stop);
        } else if seq.generated >= seq.max_new_tokens {
            self.finish(index, FinishReason::Length);
        } else {
            seq.pending_token = Some(token);
        }
    }

    /// Sends the tail of the text and the final event; the sequence leaves at the end of the step.
    fn finish(&mut self, index: usize, reason: FinishReason) {
        let seq = &mut self.live[index];
        if seq.finished.is_some() {
            return;
        }
        let tail = seq.utf8.finish();
        let mut text = seq.stops.push(&tail).emit;
        text.push_str(&seq.stops.finish());
        seq.send_text(text);
        let now = Instant::now();
        // A sequence ended before its first token (context full) has no decode stage.
        let first_token_at = seq.first_token_at.unwrap_or(now);
        seq.stage_span.record("completion_tokens", seq.generated);
        let _ = seq.events.send(TokenEvent::Finished {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: seq.prompt.len() as u32,
                completion_tokens: seq.generated,
                cached_prompt_tokens: Some(seq.cached_prompt_tokens as u32),
            },
            timings: StageTimings {
                queue: seq.queue_time,
                prefill: first_token_at.saturating_duration_since(seq.admitted_at),
                decode: now.saturating_duration_since(first_token_at),
            },
        });
        seq.finished = Some(reason);
        seq.pending_token = None;
    }

    /// Ends every sequence in `work` with an error; they leave at the end of the step.
    fn fail(&mut self, work: &[Work], error: EngineError) {
        for w in work {
            let seq = &mut self.live[w.seq()];
            let _ = seq.events.send(TokenEvent::Failed(error.clone()));
            seq.finished = Some(FinishReason::Stop);
            seq.kv_trusted = false;
        }
    }

    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i].finished.is_some() {
                let seq = self.live.remove(i);
                self.release(seq);
            } else {
                i += 1;
            }
        }
    }

    /// Frees a sequence's KV cells and slot at once.
    fn release(&mut self, seq: Sequence) {
        // With the prefix cache the cells stay, and the slot remembers what they hold; a
        // later prompt that starts the same way skips that much prefill.
        let kept = self.prefix_cache.then(|| seq.tokens_in_kv()).flatten();
        match kept {
            Some(tokens) => self.cached_prefix[seq.seq_id as usize] = tokens,
            None => {
                if let Err(err) = self
                    .ctx
                    .clear_kv_cache_seq(Some(seq.seq_id as u32), None, None)
                {
                    tracing::error!(model = %self.model_id, seq_id = seq.seq_id, %err, "could not clear KV cells");
                }
            }
        }
        self.reserved_cells -= seq.reservation;
        self.free_seq_ids.insert(seq.seq_id);
        // A sequence that ended on its own (stop, length) shows how long replies run.
        let completed =
            (seq.finished.is_some() && !seq.events.is_closed()).then_some(seq.generated);
        self.load
            .record_sequence(seq.admitted_at.elapsed(), completed);
        self.metrics.active_sequences.dec();
    }
}

/// llama.cpp's default order, cheapest cut first: penalties → top_k → top_p → temperature → draw.
/// Temperature 0 is greedy, with no randomness at all.
fn build_sampler(
    model: &LlamaModel,
    params: &SamplingParams,
    banned: Option<&[LlamaToken]>,
) -> LlamaSampler {
    let mut chain = Vec::new();
    if let Some(banned) = banned {
        let biases: Vec<LlamaLogitBias> = banned
            .iter()
            .map(|&token| LlamaLogitBias::new(token, f32::NEG_INFINITY))
            .collect();
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
    if params.temperature <= 0.0 {
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
