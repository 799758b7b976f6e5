//! Logging set-up: `RUST_LOG`-style filtering, human or JSON output.

pub mod access;
mod format;

use std::io::{IsTerminal as _, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// llama.cpp logs every tensor while loading; its warnings are what an operator needs.
pub const SERVER_FILTER: &str = "info,llama_cpp_2=warn,llama-cpp-2=warn";
/// Offline commands load vocabularies only; llama.cpp's load warnings are noise there.
pub const TOOL_FILTER: &str = "warn,llama_cpp_2=error,llama-cpp-2=error";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the log flusher running; dropping it writes out every line still gathered.
/// Hold it until the process is about to exit.
#[must_use = "dropping the guard stops the log flusher"]
pub struct LogGuard {
    batch: Arc<Batch>,
    flusher: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.batch.stop();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        self.batch.write_out();
    }
}

/// How long a log line may wait in memory before it is written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Gathered lines are written at once when they reach this size.
const BATCH_BYTES: usize = 64 * 1024;

/// Log lines gathered in memory and written to stderr in batches, every `FLUSH_INTERVAL`
/// and whenever `BATCH_BYTES` have gathered. A request's access-log line then costs a copy
/// under a lock held for that copy only, where writing each line under stderr's lock cost
/// a write(2) and, with two workers, a futex wait: a tenth of a reply-cache hit's time.
/// (`tracing-appender`'s writer thread, woken per line, cost as much again on two cores.)
/// The price: a process killed outright (SIGKILL, abort) loses up to `FLUSH_INTERVAL` of
/// lines. A panic writes out what has gathered before its message (see `init`).
struct Batch {
    lines: Mutex<Vec<u8>>,
    /// `BATCH_BYTES`, or 0 (each line written as it comes) when no flusher runs.
    batch_bytes: AtomicUsize,
    /// Held while a batch is written, so that batches reach stderr in the order taken.
    output: Mutex<()>,
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Batch {
    fn write_out(&self) {
        let _order = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        // Taken in a statement of its own, so that loggers wait only for the take.
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(PoisonError::into_inner));
        write_to_stderr(&lines);
    }

    /// `write_out` unless a lock it needs is held (by another thread, which is writing, or
    /// by this one, when a panic struck inside a write).
    fn try_write_out(&self) {
        let Ok(_order) = self.output.try_lock() else {
            return;
        };
        let Ok(mut gathered) = self.lines.try_lock() else {
            return;
        };
        let lines = std::mem::take(&mut *gathered);
        drop(gathered);
        write_to_stderr(&lines);
    }

    /// Ends the flusher; lines logged from now on (by threads still running while the
    /// process exits) are written as they come.
    fn stop(&self) {
        self.batch_bytes.store(0, Ordering::Relaxed);
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// The flusher thread's loop: a batch every `FLUSH_INTERVAL` until stopped.
    fn flush_until_stopped(&self) {
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        while !*stopped {
            stopped = self
                .wake
                .wait_timeout(stopped, FLUSH_INTERVAL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            drop(stopped);
            self.write_out();
            stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The fmt subscriber `init` installs, writing through `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // A line when each span closes, with its fields and duration: the request's route,
    // queue, prefill and decode stages, at debug. Only then: timing spans reads the clock
    // at every poll of a request, and the access line (`tiergate::access`) already gives
    // each request's times at info.
    let stage_lines = filter
        .max_level_hint()
        .is_none_or(|most_verbose| most_verbose >= LevelFilter::DEBUG);
    let builder = tracing_subscriber::fmt()
        .with_timer(format::UtcMicros)
        .with_env_filter(filter)
        .with_span_events(if stage_lines {
            FmtSpan::CLOSE
        } else {
            FmtSpan::NONE
        })
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.fmt_fields(format::TextFields).finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

/// Writes a batch of whole lines to stderr under its lock.
fn write_to_stderr(lines: &[u8]) {
    if !lines.is_empty() {
        // Nowhere to report a failed write to stderr.
        let _ = std::io::stderr().lock().write_all(lines);
    }
}

/// What the fmt layer writes each formatted line through.
struct BatchedStderr(Arc<Batch>);

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = &'a Batch;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

impl Write for &Batch {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
            lines.extend_from_slice(line);
            lines.len() >= self.batch_bytes.load(Ordering::Relaxed)
        };
        if full {
            self.write_out();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `default_filter` applies when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default_filter: &str) -> LogGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let batch = Arc::new(Batch {
        lines: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
        batch_bytes: AtomicUsize::new(BATCH_BYTES),
        output: Mutex::new(()),
        stopped: Mutex::new(false),
        wake: Condvar::new(),
    });
    let flusher = {
        let batch = Arc::clone(&batch);
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || batch.flush_until_stopped())
            .ok()
    };
    if flusher.is_none() {
        batch.batch_bytes.store(0, Ordering::Relaxed);
    }
    // A panic's message goes straight to stderr: the lines logged before it go first.
    let panic_message = std::panic::take_hook();
    let gathered = Arc::clone(&batch);
    std::panic::set_hook(Box::new(move |info| {
        gathered.try_write_out();
        panic_message(info);
    }));
    // Colours only for a person at a terminal, not in files and log collectors.
    let ansi = std::io::stderr().is_terminal();
    let subscriber = subscriber(format, filter, ansi, BatchedStderr(Arc::clone(&batch)));
    // A second init (tests) is harmless: keep the first subscriber.
    if subscriber.try_init().is_ok() && !ansi {
        access::install(access::AccessWriter {
            batch: Arc::clone(&batch),
            json: format == LogFormat::Json,
        });
    }
    LogGuard { batch, flusher }
}

/// A writer that keeps what the fmt layer writes, for tests.
#[cfg(test)]
mod captured {
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    pub(super) struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        pub(super) fn text(&self) -> String {
            let bytes = self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            String::from_utf8(bytes).expect("log lines are UTF-8")
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            lines.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Lines {
        type Writer = Lines;

        fn make_writer(&self) -> Self::Writer {
            self.clone()
        }
    }
}
