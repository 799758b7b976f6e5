#!/usr/bin/env bash
# Soak test (`just soak [MINUTES]`): starts a gateway on a free port with CONFIG and the
# default policy, runs benches/soak.py against it for MINUTES, stops it. Exits non-zero on
# any unexpected error or on sequences or KV cells still held at the end.
#
#   benches/soak.sh [CONFIG] [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
config=${1:-config/tiergate.toml}
minutes=${2:-10}
bin=target/release/tiergate
server_pid=

cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

port=$(free_port)
url="http://127.0.0.1:$port"
echo "soak: starting a gateway on $url for $minutes min" >&2
"$bin" serve --config "$config" --listen "127.0.0.1:$port" 2>/tmp/tiergate-soak-server.log &
server_pid=$!
wait_ready "$url/ready" || exit 1
python3 benches/soak.py "$url" "$server_pid" "$minutes"
