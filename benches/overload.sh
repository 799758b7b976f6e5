#!/usr/bin/env bash
# Overload benchmark for latency budgets (`just bench-overload`).
#
#   benches/overload.sh [CONFIG] [SECONDS]
#
# 1. Starts a gateway on a free port with CONFIG and benches/overload-policy.toml.
# 2. Measures what the full tier can serve: a closed loop of 16 streams (its slots),
#    64 tokens each, budgets off. Capacity = completed requests per second.
# 3. Offers three times that as an open loop (Poisson arrivals) for SECONDS (default 30),
#    once with degradation on (2 s TTFT budget: predicted or watchdog-detected misses go
#    to the fast tier or are shed with 503) and once with it off (same tier, no budgets).
# 4. Prints, for both: the share of admitted requests whose TTFT met 2 s, TTFT p50/p99,
#    and how many were degraded, served from cache, and shed. Raw reports go to
#    target/bench-overload/*.json.
#
# Run on an otherwise idle machine: a build on the other core makes the numbers noise.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
config=${1:-config/tiergate.toml}
seconds=${2:-30}
bin=target/release/tiergate
out=target/bench-overload
mkdir -p "$out"
echo "overload: starting a gateway" >&2
start_gateway "$out/server.log" --config "$config" --policy benches/overload-policy.toml || exit 1

load() { "$bin" bench --url "$url" --model auto --max-tokens 64 --ttft-budget-ms 2000 --json "$@"; }

echo "overload: measuring the full tier's capacity (16 concurrent streams, budgets off)" >&2
# The first requests touch the weights' pages for the first time: warm up, then measure.
load --header "x-tiergate-route-hint: budget-off" --concurrency 16 --requests 16 >/dev/null
load --header "x-tiergate-route-hint: budget-off" --concurrency 16 --requests 48 >"$out/capacity.json"
rate=$(python3 -c 'import json,sys; l=json.load(open(sys.argv[1]))["models"][0]["levels"][0]; print(round(3 * l["ok"] / l["wall_s"], 2))' "$out/capacity.json")
echo "overload: offering $rate requests/s (3x capacity) for ${seconds}s, degradation on" >&2
load --header "x-tiergate-route-hint: budget-on" --rate "$rate" --duration-s "$seconds" --seed 1 >"$out/on.json"
echo "overload: the same load, degradation off" >&2
load --header "x-tiergate-route-hint: budget-off" --rate "$rate" --duration-s "$seconds" --seed 1 >"$out/off.json"

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
cap = json.load(open(f"{out}/capacity.json"))["models"][0]["levels"][0]
print(f"full tier capacity: {cap['ok'] / cap['wall_s']:.2f} requests/s "
      f"({cap['output_tokens_per_s']:.0f} tokens/s at 16 streams, 64 tokens each)")
rows = []
for mode in ("on", "off"):
    level = json.load(open(f"{out}/{mode}.json"))["models"][0]["levels"][0]
    budget, ttft, statuses = level["budget"], level["ttft_ms"] or {}, level["statuses"]
    degraded = sum(level["degraded"].values())
    cached = sum(n for outcome, n in level["cache"].items() if outcome != "miss")
    shed = statuses.get("503", 0) + statuses.get("429", 0)
    met = budget["fraction_met"]
    rows.append((mode, level["load"]["rate"], level["requests"], level["ok"],
                 "-" if met is None else f"{100 * met:.1f}% ({budget['met']}/{budget['admitted']})",
                 ttft.get("p50", "-"), ttft.get("p99", "-"), degraded, cached, shed,
                 sum(n for s, n in statuses.items() if s not in ("200", "503", "429"))))
header = ("degradation", "rate/s", "sent", "admitted", "TTFT<=2s of admitted",
          "TTFT p50 ms", "TTFT p99 ms", "degraded", "cached", "shed", "errors")
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
for row in [header] + rows:
    print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
PY
