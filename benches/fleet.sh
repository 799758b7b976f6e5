#!/usr/bin/env bash
# A remote tier on real engines: llama-server replicas behind tiergate, on one machine.
#
#   benches/fleet.sh /path/to/llama-server [fast|full]
#
# Three runs of the same load (tiergate bench, streaming, --max-tokens 64):
#   1. one llama-server (all cores, 16 slots), called directly;
#   2. the same llama-server behind tiergate, as a one-endpoint fleet;
#   3. two llama-servers (half the cores and 8 slots each) behind tiergate.
# On one machine the replicas share its cores, so run 3 shows the fleet spreading load
# (least outstanding requests, prefix affinity), not more hardware. llama-server is not
# built by this project; see README (Performance) for how to build it from the
# llama-cpp-python sdist. Extra `tiergate bench` flags go in TIERGATE_BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
llama_server=${1:?usage: $0 /path/to/llama-server [fast|full]}
tier=${2:-fast}
bin=target/release/tiergate
cores=$(nproc)
half=$(( cores > 1 ? cores / 2 : 1 ))
source benches/lib.sh

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap cleanup EXIT
workdir=$(mktemp -d)
echo "logs: $workdir" >&2

# llama_server_on PORT THREADS SLOTS: starts a replica with 2048 cells per slot.
llama_server_on() {
  # shellcheck disable=SC2086
  "$llama_server" -m "${gguf[$tier]}" ${template[$tier]} -c $(( $3 * 2048 )) -np "$3" -t "$2" -tb "$2" \
    --alias "$tier" --host 127.0.0.1 --port "$1" --no-webui 2>"$workdir/llama-$1.log" &
  pids+=($!)
  wait_ready "http://127.0.0.1:$1/health" 900
}

# gateway_over SLOTS URL...: a tiergate whose tier is a fleet of these llama-servers,
# each with SLOTS slots.
gateway_over() {
  local port endpoints slots=$1
  shift
  port=$(free_port)
  endpoints=$(printf '"%s/v1",' "$@")
  cat >"$workdir/tiergate.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[router]
policies = ["$PWD/benches/throughput-policy.toml"]
watch = false
[[model]]
id = "$tier-fleet"
tier = "fast"
endpoints = [${endpoints%,}]
upstream_model = "$tier"
slots = $slots
EOF
  "$bin" serve --config "$workdir/tiergate.toml" 2>"$workdir/tiergate-$port.log" &
  pids+=($!)
  gateway="http://127.0.0.1:$port"
  wait_ready "$gateway/ready" 300
}

# run_load URL MODEL: 16 requests to warm the servers (their first requests are slow,
# and llama-server's prompt cache fills), then the measured levels.
# shellcheck disable=SC2086
run_load() {
  "$bin" bench --url "$1" --model "$2" --concurrency 16 --requests 32 --max-tokens 16 >/dev/null 2>&1
  "$bin" bench --url "$1" --model "$2" --concurrency "${TIERGATE_BENCH_CONCURRENCY:-1,4,16}" \
    --max-tokens 64 ${TIERGATE_BENCH_ARGS:-}
}

echo "== one llama-server ($cores threads, 16 slots), direct" >&2
one=$(free_port)
llama_server_on "$one" "$cores" 16
run_load "http://127.0.0.1:$one" "$tier"

echo "== the same llama-server behind tiergate" >&2
gateway_over 16 "http://127.0.0.1:$one"
run_load "$gateway" fast
cleanup

echo "== two llama-servers ($half threads, 8 slots each) behind tiergate" >&2
a=$(free_port)
llama_server_on "$a" "$half" 8
b=$(free_port)
llama_server_on "$b" "$half" 8
gateway_over 8 "http://127.0.0.1:$a" "http://127.0.0.1:$b"
run_load "$gateway" fast
echo "== requests per endpoint" >&2
curl -s "$gateway/metrics" | grep '^tiergate_upstream_requests_total' >&2
