#!/usr/bin/env bash
# `arbor bench` of the 1.5B target with the 0.5B draft (`--tree auto`, 4 HumanEval prompts),
# optionally with a busy calibration: with `busy`, two busy loops run from the start until the
# planner logs its verify curve ("verify cost by tree size"), so the curve is measured on a
# busy host by construction. Prints τ, rates, re-timings and the planner's final curve.
#
#   cargo build --release -p arbor-server
#   bash scripts/bench-busy-calibration.sh [ARBOR_BINARY] [OUT.json] [busy]
set -u
cd "$(dirname "$0")/.."
bin=${1:-target/release/arbor}
out=${2:-bench-results/busy-calibration.json}
busy=${3:-}
mkdir -p "$(dirname "$out")"
log=${out%.json}.log
RUST_LOG=arbor_engine=debug "$bin" bench --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \
  --prompts bench/prompts/humaneval.jsonl.gz --limit 4 --max-tokens 128 --json "$out" \
  > "${out%.json}.txt" 2> "$log" &
pid=$!
if [ "$busy" = busy ]; then
  loops=()
  for _ in 1 2; do (while :; do :; done) & loops+=($!); done
  while kill -0 "$pid" 2>/dev/null && ! grep -q "verify cost by tree size" "$log"; do sleep 0.05; done
  kill "${loops[@]}" 2>/dev/null
fi
wait "$pid" || { tail -5 "$log"; exit 1; }
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
o, p = r["overall"], r["planner"]
curve = [(n, round(s * 1000, 1)) for n, s in p["verify_cost"]]
print(f"tau {o['tau']:.2f}  spec {o['spec_tokens_per_sec']:.2f} tok/s  plain "
      f"{o['plain_tokens_per_sec']:.2f} tok/s  speedup {o['speedup']:.2f}x  "
      f"re-timings {p.get('refreshes', '-')}  verify ms {curve}")
PY
sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E "verify cost by tree size|verify cost re-timed" | sed 's/^.*DEBUG //'
