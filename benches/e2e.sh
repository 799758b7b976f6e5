#!/usr/bin/env bash
# End-to-end load benchmark: TTFT, inter-token latency and aggregate output tokens/s at
# concurrency 1, 4 and 16 for each tier, printed as a table (add --json for JSON).
#
#   benches/e2e.sh [URL] [CONFIG] [tiergate bench flags...]
#
# If nothing answers at URL, a gateway is started here on a free port with CONFIG and
# benches/throughput-policy.toml (budgets too large to shed load), and
# stopped afterwards. Run on an otherwise idle machine: a build on the other core makes
# the numbers noise.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
url=${1:-http://127.0.0.1:8080}
config=${2:-config/tiergate.toml}
bin=target/release/tiergate
if curl -sf "$url/health" >/dev/null 2>&1; then
  wait_ready "$url/ready" || exit 1
else
  echo "bench: starting a gateway" >&2
  start_gateway /tmp/tiergate-bench-server.log --config "$config" --policy benches/throughput-policy.toml || exit 1
fi

"$bin" bench --url "$url" --model fast --model full --concurrency 1,4,16 --max-tokens 64 "${@:3}"
