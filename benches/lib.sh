# Shell helpers shared by the bench scripts; `source` it from the repository root.

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
