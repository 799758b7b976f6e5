#!/usr/bin/env bash
# Same load, same model, same machine: tiergate against llama.cpp's own llama-server.
#
#   benches/compare-llama-server.sh /path/to/llama-server [fast|full]...
#
# llama-server is not built by this project; see README (Performance) for how to build it
# from the llama-cpp-python sdist. Each tier is measured on tiergate and then on a
# llama-server started with the matching settings (16 slots, 2048 cells each, 2 threads),
# one after the other, so that both see the same machine. Prints a table per run; extra
# `tiergate bench` flags (e.g. --json) go in TIERGATE_BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
llama_server=${1:?usage: $0 /path/to/llama-server [tier...]}
shift
tiers=("${@:-fast full}")
[ $# -gt 0 ] || tiers=(fast full)
bin=target/release/tiergate
threads=${TIERGATE_BENCH_THREADS:-$(nproc)}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

source benches/lib.sh
# shellcheck disable=SC2086
run_load() { "$bin" bench --url "$1" --model "$2" --concurrency "${TIERGATE_BENCH_CONCURRENCY:-1,4,16}" --max-tokens 64 ${TIERGATE_BENCH_ARGS:-}; }


for tier in "${tiers[@]}"; do
  port=$(free_port)
  "$bin" serve --listen "127.0.0.1:$port" --policy benches/throughput-policy.toml 2>/tmp/compare-tiergate.log &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/ready" 900
  echo "== tiergate $tier" >&2
  run_load "http://127.0.0.1:$port" "$tier"
  cleanup; pids=()

  port=$(free_port)
  # shellcheck disable=SC2086
  "$llama_server" -m "${gguf[$tier]}" ${template[$tier]} -c 32768 -np 16 -t "$threads" -tb "$threads" \
    --host 127.0.0.1 --port "$port" --no-webui 2>/tmp/compare-llama-server.log &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/health" 900
  echo "== llama-server $tier" >&2
  run_load "http://127.0.0.1:$port" "$tier"
  cleanup; pids=()
done
