//! Logging set-up: `RUST_LOG`-style filtering, human or JSON output.

use std::io::IsTerminal as _;

use tracing_subscriber::fmt::format::FmtSpan;
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

/// `default_filter` applies when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A line when each span closes, with its fields and duration: one per request at
        // info (the `request` span), and its route/queue/prefill/decode stages at debug.
        .with_span_events(FmtSpan::CLOSE)
        // Colours only for a person at a terminal, not in files and log collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
