//! Logging set-up: `RUST_LOG`-style filtering, human or JSON output.

use tracing_subscriber::EnvFilter;

/// llama.cpp logs every tensor while loading; its warnings are what an operator needs.
const DEFAULT_FILTER: &str = "info,llama_cpp_2=warn,llama-cpp-2=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
