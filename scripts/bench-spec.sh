#!/usr/bin/env bash
# The speculative-decoding figures in the README: Qwen2.5-Coder-1.5B target, 0.5B draft (f16
# weights), greedy, 128 new tokens, HumanEval and the chat set, plus tree-policy and draft
# comparisons. Each run measures plain decoding of the same target on the same prompts in the
# same process. Writes bench-results/*.json, *.txt and *.png. Weights as stored (GGUF blocks);
# `EXTRA=--f32-weights bash scripts/bench-spec.sh` reproduces the f32-weights table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p arbor-server
out=${OUT:-bench-results}
mkdir -p "$out"
arbor=./target/release/arbor
T=qwen2.5-coder-1.5b
D=qwen2.5-coder-0.5b
HE=bench/prompts/humaneval.jsonl.gz
CHAT=bench/prompts/chat.jsonl
run() {
    local name=$1
    shift
    # shellcheck disable=SC2086  # EXTRA is a list of flags, e.g. EXTRA=--f32-weights
    "$arbor" bench --target "$T" ${EXTRA:-} "$@" --json "$out/$name.json" --plot "$out/$name.png" \
        2> "$out/$name.log" | tee "$out/$name.txt"
}
run humaneval-auto --draft "$D" --tree auto --prompts "$HE" --limit "${N_HE:-10}" --max-tokens 128
run chat-auto --draft "$D" --tree auto --prompts "$CHAT" --limit "${N_CHAT:-6}" --max-tokens 128
for tree in chain:4 2,2,1,1; do
    run "humaneval-${tree//[:,]/_}" --draft "$D" --tree "$tree" --prompts "$HE" --limit 4 --max-tokens 128
done
run humaneval-ngram --draft ngram --tree auto --prompts "$HE" --limit 4 --max-tokens 128
run humaneval-self --draft self:8@f16 --tree auto --prompts "$HE" --limit 4 --max-tokens 128
run humaneval-t07 --draft "$D" --tree auto --prompts "$HE" --limit 4 --max-tokens 128 \
    --temperature 0.7 --seed 1
