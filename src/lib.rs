//! tiergate: an LLM gateway that hosts GGUF model tiers in-process (llama.cpp) and serves
//! OpenAI-compatible chat completions with continuous batching.

pub mod admission;
pub mod api;
pub mod budget;
pub mod cache;
pub mod chat;
pub mod check;
pub mod config;
pub mod embed;
pub mod engine;
pub mod evaluate;
pub mod gateway;
pub mod loadgen;
pub mod metrics;
pub mod remote;
pub mod router;
pub mod semantic;
pub mod server;
pub mod telemetry;
pub mod tiers;
pub mod tomlfile;
