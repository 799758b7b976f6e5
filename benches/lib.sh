# Shell helpers shared by the bench scripts; `source` it from the repository root.

# Each tier's default GGUF, and the llama-server flag for its chat template (Gemma 3's
# file has none), for the scripts that run llama-server on the same model as a tier.
# shellcheck disable=SC2034
declare -A gguf=([fast]=models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf [full]=models/gguf/gemma-3-270m-q4_k_m.gguf)
# shellcheck disable=SC2034
declare -A template=([fast]="" [full]="--chat-template gemma")

# A free local TCP port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until URL answers 2xx, polling every 0.1 s up to TRIES times (default 600, 60 s).
wait_ready() {
  local url=$1 tries=${2:-600}
  for _ in $(seq 1 "$tries"); do
    curl -sf "$url" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "not ready: $url" >&2
  return 1
}

# Starts `target/release/tiergate serve` on a free port with the given extra arguments,
# logging to LOG, and waits until it is ready. Sets `server_pid` and `url`, and stops the
# server when the calling script exits.
#
#   start_gateway LOG [SERVE ARGS...]
start_gateway() {
  local log=$1
  shift
  local port
  port=$(free_port)
  url="http://127.0.0.1:$port"
  target/release/tiergate serve --listen "127.0.0.1:$port" "$@" 2>"$log" &
  server_pid=$!
  trap stop_gateway EXIT
  wait_ready "$url/ready"
}

stop_gateway() {
  if [ -n "${server_pid:-}" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
