#!/usr/bin/env bash
# The serving figures in the README: `arbor serve` (tree policy `auto`) under 1, 4 and 16 concurrent streams,
# speculation on and off (same server, per-request switch), for SmolLM2-135M, Qwen2.5-Coder-0.5B
# and -1.5B (n-gram draft; the 1.5B also with the 0.5B as draft). Greedy, 64 new tokens,
# HumanEval prompts. Appends JSON lines to bench-results/serve.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p arbor-server
out=${OUT:-bench-results}
mkdir -p "$out"
port=${PORT:-8199}
CONC=${CONC:-1,4,16}
run() {
    local label=$1
    shift
    ./target/release/arbor serve --port "$port" "$@" 2> "$out/serve-$label.log" &
    local pid=$!
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
        sleep 0.5
    done
    python3 scripts/load-test.py --url "http://127.0.0.1:$port" --concurrency "$CONC" \
        --max-tokens "${MAX_TOKENS:-64}" --label "$label" --json "$out/serve.jsonl" || true
    kill -TERM "$pid"
    wait "$pid" || true
}
# RUNS selects a subset, e.g. RUNS="smollm2-ngram qwen1.5b-ngram".
RUNS=${RUNS:-smollm2-ngram qwen0.5b-ngram qwen1.5b-ngram qwen1.5b-draft0.5b}
for r in $RUNS; do
    case $r in
        smollm2-ngram) run "$r" --model smollm2-135m --draft ngram ;;
        qwen0.5b-ngram) run "$r" --model qwen2.5-coder-0.5b --draft ngram ;;
        qwen1.5b-ngram) run "$r" --model qwen2.5-coder-1.5b --draft ngram ;;
        qwen1.5b-draft0.5b)
            run "$r" --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b ;;
        *) echo "unknown run $r" >&2 ;;
    esac
done
