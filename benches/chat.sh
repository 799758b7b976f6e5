#!/usr/bin/env bash
# Follow-up turns: the same conversations replayed against tiergate and llama.cpp's own
# llama-server (prompt cache on, its default) on the same GGUF, TTFT by turn side by side.
#
#   benches/chat.sh /path/to/llama-server [fast|full]...
#
# tiergate serves both tiers with the reply cache and budgets off (throughput policy);
# each llama-server runs one tier's GGUF with the same slots, cells per slot and threads.
# Conversation counts and turns: TIERGATE_CHAT_CONVERSATIONS (4,16), TIERGATE_CHAT_TURNS (6).
set -euo pipefail
cd "$(dirname "$0")/.."
llama_server=${1:?usage: $0 /path/to/llama-server [tier...]}
shift
tiers=("$@")
[ $# -gt 0 ] || tiers=(fast full)
bin=target/release/tiergate
threads=${TIERGATE_BENCH_THREADS:-$(nproc)}
source benches/lib.sh


start_gateway /tmp/bench-chat-tiergate.log --policy benches/throughput-policy.toml
peer_pid=
stop_all() { [ -z "$peer_pid" ] || { kill "$peer_pid" 2>/dev/null; wait "$peer_pid" 2>/dev/null; } || true; stop_gateway; }
trap stop_all EXIT

for tier in "${tiers[@]}"; do
  port=$(free_port)
  # 16 slots of 2048 cells, as tiergate's default config; --jinja off so that both apply
  # llama.cpp's built-in template code to the same messages.
  # shellcheck disable=SC2086
  "$llama_server" -m "${gguf[$tier]}" ${template[$tier]} -c 32768 -np 16 -t "$threads" -tb "$threads" \
    --no-jinja --host 127.0.0.1 --port "$port" --no-webui 2>/tmp/bench-chat-llama-server.log &
  peer_pid=$!
  wait_ready "http://127.0.0.1:$port/health" 900
  echo "== $tier: $(basename "${gguf[$tier]}")" >&2
  "$bin" bench-chat --model "$tier" \
    --conversations "${TIERGATE_CHAT_CONVERSATIONS:-4,16}" --turns "${TIERGATE_CHAT_TURNS:-6}" \
    --target "tiergate=$url" --target "llama-server=http://127.0.0.1:$port"
  kill "$peer_pid"; wait "$peer_pid" 2>/dev/null || true; peer_pid=
done
