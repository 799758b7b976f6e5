# tiergate tasks. Variables take their defaults from the environment.

config := env_var_or_default("TIERGATE_CONFIG", "config/tiergate.toml")
url := env_var_or_default("TIERGATE_URL", "http://127.0.0.1:8080")
features := env_var_or_default("TIERGATE_FEATURES", "")
cargo_features := if features == "" { "" } else { "--features " + features }

# List the recipes.
default:
    @just --list

# Fetch, reassemble and verify the default models (does nothing when they are present and valid).
models:
    python3 models/fetch.py

# Build the release binary (llama.cpp is compiled with optimisations; debug builds are unusably slow).
build:
    cargo build --release --locked {{cargo_features}}

# Run the gateway on the configured models, fetching the default models first.
run *ARGS: models build
    target/release/tiergate serve --config {{config}} {{ARGS}}

# The unmodified `openai` SDK, which the tool-calling test drives from Python.
sdk:
    python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check openai

# Unit and end-to-end tests on the real models.
test: models sdk
    cargo test --release --locked {{cargo_features}}

fmt:
    cargo fmt --all

# Formatting and clippy, warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --release --locked --all-targets {{cargo_features}} -- -D warnings

# Load test against a gateway (started here on a free port unless TIERGATE_URL answers); prints a table.
bench *ARGS: models build
    benches/e2e.sh {{url}} {{config}} {{ARGS}}

# Open-loop overload at 3x the full tier's capacity, degradation on and off; prints a table.
bench-overload seconds="30": models build
    benches/overload.sh {{config}} {{seconds}}

# Mixed traffic for MINUTES; reports memory, file descriptors, KV cells left, errors by kind.
soak minutes="10": models build
    benches/soak.sh {{config}} {{minutes}}

# Embedding latency (alone and 16 concurrent) and semantic-index lookups at 10k and 100k entries.
bench-embedding: models
    cargo bench --locked --bench embedding

# What proxying a remote tier adds: TTFT and per-chunk latency, direct vs through tiergate, at 1, 64 and 512 streams.
bench-proxy: build
    cargo bench --locked --bench proxy

# Reply-cache hits against a bare axum handler returning the same bytes (wrk -t1 -c16; needs wrk).
bench-hit: models build
    cargo bench --locked --bench hit_path

# llama-server replicas behind tiergate against one called directly (LLAMA_SERVER: path to a llama-server binary).
bench-fleet llama_server tier="fast": models build
    benches/fleet.sh {{llama_server}} {{tier}}

# Follow-up turns: C conversations x M turns, TTFT by turn, tiergate beside llama-server (LLAMA_SERVER: its binary).
bench-chat llama_server *tiers: models build
    benches/chat.sh {{llama_server}} {{tiers}}

# Routing agreement on the held-out labelled prompts, with and without the example rules.
eval-routing *ARGS: models build
    target/release/tiergate eval-routing {{ARGS}}

# Semantic cache hit and false-hit rates on the labelled pairs, with and without the guards.
eval-semantic *ARGS: models build
    target/release/tiergate eval-semantic {{ARGS}}
