//! The sentence-embedding model (all-MiniLM-L6-v2) that example-based routing and the
//! semantic reply cache share: one vector per request, computed once.
//!
//! ```text
//! Embedder::embed(text) ─► channel ─► embedding thread: takes every waiting text (up to
//!        ▲                             `max_batch`), one padded forward pass, mean pooling,
//!        └──── oneshot ◄───────────── unit length ─► each caller gets its vector
//! ```
//!
//! The model runs on candle's CPU backend on a thread of its own, never on the async
//! runtime; texts that arrive together share one forward pass. Why candle and not
//! llama.cpp's embedding mode: the weights ship as safetensors, which candle reads as they
//! are (checked by sha256), while llama.cpp needs a GGUF conversion (a Python step with
//! torch, which our machines lack). The README records the measured latencies.
//!
//! Texts longer than the model's window ([`MAX_TOKENS`] word pieces, [CLS] and [SEP]
//! included) keep their beginning: that is how the model was trained (sentence-transformers
//! truncates on the right) and where a chat question usually states its subject.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use anyhow::{anyhow, Context as _};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use prometheus_client::metrics::histogram::Histogram;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::{mpsc, oneshot};

use crate::config::EmbeddingConfig;

/// The model's window in word pieces (sentence-transformers' `max_seq_length`).
pub const MAX_TOKENS: usize = 256;

/// A unit-length sentence embedding: the dot product of two is their cosine similarity.
pub type Embedding = Arc<[f32]>;

/// Cosine similarity of two unit vectors. Eight independent partial sums: a single
/// running sum is one long dependency chain the compiler may not reorder (float addition
/// is not associative), so it cannot use SIMD lanes; this form vectorises.
pub fn similarity(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error("the embedding model failed: {0}")]
    Model(String),
    #[error("the embedding thread has stopped")]
    Stopped,
    #[error("the embedding queue is full")]
    Busy,
}

/// Texts waiting for the embedding thread at most; beyond it a request is not embedded
/// (it routes by its other features) rather than waiting behind a backlog.
const QUEUE_CAPACITY: usize = 256;

/// The BERT encoder and its tokenizer, loaded from a sentence-transformers export
/// (`config.json`, `tokenizer.json`, `model.safetensors`).
pub struct EmbeddingModel {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
}

impl EmbeddingModel {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            anyhow::ensure!(
                path.exists(),
                "{} is missing (run `just models`)",
                path.display()
            );
            Ok(path)
        };
        let config: BertConfig = serde_json::from_str(
            &std::fs::read_to_string(read("config.json")?).context("reading config.json")?,
        )
        .context("parsing config.json")?;
        let mut tokenizer = Tokenizer::from_file(read("tokenizer.json")?)
            .map_err(|e| anyhow!("loading tokenizer.json: {e}"))?;
        // The export pads every text to 128 and truncates there; we pad a batch to its
        // longest text and keep the model's full window.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("setting truncation: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let device = Device::Cpu;
        let weights = read("model.safetensors")?;
        // SAFETY: the file is memory-mapped read-only; `just models` verified its sha256
        // and nothing rewrites it while we run.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device) }
            .context("mapping model.safetensors")?;
        let model = BertModel::load(vb, &config).context("loading the BERT weights")?;
        Ok(Self {
            model,
            tokenizer,
            device,
            dimensions: config.hidden_size,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// One forward pass over `texts`: mean-pooled over real tokens, then unit length.
    pub fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let rows = |pick: fn(&tokenizers::Encoding) -> &[u32]| -> candle_core::Result<Tensor> {
            let rows = encodings
                .iter()
                .map(|e| Tensor::new(pick(e), &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&rows, 0)
        };
        let ids = rows(|e| e.get_ids())?;
        let type_ids = rows(|e| e.get_type_ids())?;
        let mask = rows(|e| e.get_attention_mask())?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        // Mean over the tokens the mask keeps (padding must not pull the mean).
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        let unit = mean.broadcast_div(&norms.clamp(1e-12, f32::MAX)?)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}

/// What the embedding thread is asked to do.
struct Job {
    text: String,
    reply: oneshot::Sender<Result<Embedding, EmbedError>>,
}

/// The shared handle: send texts, get vectors; concurrent callers are batched.
pub struct Embedder {
    jobs: mpsc::Sender<Job>,
    /// Vectors of policy examples by text, so a policy reload embeds only what changed.
    examples: Mutex<HashMap<String, Embedding>>,
    /// Vectors of recent short request texts. A repeated question (every reply-cache hit
    /// is one) would otherwise run the model again: a forward pass costs milliseconds,
    /// a lookup well under a microsecond.
    recent: quick_cache::sync::Cache<String, Embedding>,
}

/// Request texts whose vectors [`Embedder::embed`] keeps (quick_cache evicts the ones
/// used least, by its CLOCK-Pro policy).
const RECENT_ENTRIES: usize = 4096;
/// Longer texts are embedded every time: such a key would cost more memory than it saves
/// (4096 of these and their vectors come to about 14 MiB).
const RECENT_MAX_TEXT_BYTES: usize = 2048;

/// Histograms the embedding thread feeds (none in tools that do not serve).
#[derive(Clone, Default)]
pub struct EmbedMetrics {
    pub batch_size: Option<Histogram>,
    pub seconds: Option<Histogram>,
}

impl Embedder {
    /// Loads the configured model (it reads about 90 MB: call it from a blocking thread)
    /// and starts its thread.
    pub fn load(config: &EmbeddingConfig, metrics: EmbedMetrics) -> anyhow::Result<Arc<Self>> {
        let model = EmbeddingModel::load(&config.model_dir).with_context(|| {
            format!(
                "cannot load the embedding model from {}",
                config.model_dir.display()
            )
        })?;
        tracing::info!(dir = %config.model_dir.display(), dimensions = model.dimensions(), "embedding model loaded");
        Ok(Self::start(model, config.max_batch, metrics))
    }

    /// Starts the embedding thread. `max_batch` bounds the texts in one forward pass.
    pub fn start(model: EmbeddingModel, max_batch: usize, metrics: EmbedMetrics) -> Arc<Self> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE_CAPACITY);
        let spawned = thread::Builder::new()
            .name("embedding".into())
            .spawn(move || {
                while let Some(first) = queue.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < max_batch.max(1) {
                        match queue.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    run_batch(&model, batch, &metrics);
                }
            });
        if let Err(err) = spawned {
            // Without a thread every call answers `Stopped`; the caller decides.
            tracing::error!(%err, "could not start the embedding thread");
        }
        Arc::new(Self {
            jobs,
            examples: Mutex::new(HashMap::new()),
            recent: quick_cache::sync::Cache::new(RECENT_ENTRIES),
        })
    }

    /// The vector of `text`: a recent one's from memory, otherwise batched with whatever
    /// else is waiting for the model.
    pub async fn embed(&self, text: &str) -> Result<Embedding, EmbedError> {
        if let Some(vector) = self.recent.get(text) {
            return Ok(vector);
        }
        let vector = self.embed_now(text).await?;
        if text.len() <= RECENT_MAX_TEXT_BYTES {
            self.recent.insert(text.to_owned(), vector.clone());
        }
        Ok(vector)
    }

    async fn embed_now(&self, text: &str) -> Result<Embedding, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job {
                text: text.to_owned(),
                reply,
            })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => EmbedError::Busy,
                mpsc::error::TrySendError::Closed(_) => EmbedError::Stopped,
            })?;
        answer.await.map_err(|_| EmbedError::Stopped)?
    }

    /// Queues `text` from a synchronous caller, waiting while the queue is full.
    fn enqueue_blocking(&self, text: &str) -> Result<Answer, EmbedError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .blocking_send(Job {
                text: text.to_owned(),
                reply,
            })
            .map_err(|_| EmbedError::Stopped)?;
        Ok(answer)
    }

    /// The vector of `text` from a synchronous caller (a command-line tool); must not be
    /// called on an async worker thread.
    pub fn embed_blocking(&self, text: &str) -> Result<Embedding, EmbedError> {
        Ok(self
            .embed_all_blocking(std::slice::from_ref(&text))?
            .remove(0))
    }

    /// The vectors of `texts`, in order, from a synchronous caller: all are queued before
    /// any is awaited, so they share forward passes. Must not be called on an async
    /// worker thread.
    pub fn embed_all_blocking<T: AsRef<str>>(
        &self,
        texts: &[T],
    ) -> Result<Vec<Embedding>, EmbedError> {
        let answers = texts
            .iter()
            .map(|text| self.enqueue_blocking(text.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        answers
            .into_iter()
            .map(|answer| answer.blocking_recv().map_err(|_| EmbedError::Stopped)?)
            .collect()
    }

    /// Vectors for a policy's examples, remembered by text so that a reload embeds only
    /// new or changed ones. Must not be called on an async worker thread.
    pub fn embed_examples_blocking(&self, texts: &[String]) -> Result<Vec<Embedding>, EmbedError> {
        let mut known = self.examples.lock().unwrap_or_else(PoisonError::into_inner);
        let new: Vec<&String> = texts.iter().filter(|t| !known.contains_key(*t)).collect();
        let vectors = self.embed_all_blocking(&new)?;
        known.extend(new.into_iter().cloned().zip(vectors));
        // Only the current examples are worth remembering: edits must not grow the memo.
        let current: std::collections::HashSet<&String> = texts.iter().collect();
        known.retain(|text, _| current.contains(text));
        Ok(texts
            .iter()
            .filter_map(|text| known.get(text).cloned())
            .collect())
    }
}

/// Where the embedding thread sends one text's vector.
type Answer = oneshot::Receiver<Result<Embedding, EmbedError>>;

fn run_batch(model: &EmbeddingModel, mut batch: Vec<Job>, metrics: &EmbedMetrics) {
    // A caller that gave up (its request ended or timed out) needs no vector.
    batch.retain(|job| !job.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let texts: Vec<&str> = batch.iter().map(|job| job.text.as_str()).collect();
    // A panic inside candle fails this batch, not the thread: later requests still embed.
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.embed_batch(&texts)))
            .unwrap_or_else(|_| Err(anyhow!("the embedding forward pass panicked")));
    if let Some(histogram) = &metrics.batch_size {
        histogram.observe(batch.len() as f64);
    }
    if let Some(histogram) = &metrics.seconds {
        histogram.observe(started.elapsed().as_secs_f64());
    }
    match outcome {
        Ok(vectors) => {
            for (job, vector) in batch.into_iter().zip(vectors) {
                // A caller that gave up is fine: nobody is left to tell.
                let _ = job.reply.send(Ok(vector.into()));
            }
        }
        Err(err) => {
            let error = EmbedError::Model(format!("{err:#}"));
            for job in batch {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}
