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
echo "soak: starting a gateway for $minutes min" >&2
start_gateway /tmp/tiergate-soak-server.log --config "$config" || exit 1
echo "soak: $url" >&2
python3 benches/soak.py "$url" "$server_pid" "$minutes"
