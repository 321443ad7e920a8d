#!/usr/bin/env python3
"""Arbor speculative decoding against llama.cpp plain decoding, side by side in one run, on the
same prompts and GGUF files (greedy, up to --max-tokens new tokens, EOS honoured by both).

    cargo build --release -p arbor-server
    pip install llama-cpp-python==0.3.36 numpy
    python3 scripts/bench-spec-vs-llama.py [--limit 4] [--tree auto] [--threads 2] [--rounds 3]

Runs `arbor bench --target T --draft D --prompts P --json` (which also times Arbor's own plain
decoding of the same prompts in the same process), then llama.cpp through llama-cpp-python on
the same prompt texts — once right before and once right after Arbor's run, averaged —: decode
tokens/s = tokens after the first / time after the first. Both sides stop at any
end-of-generation token. One table row per round (`--rounds`), and the medians.
Prints a Markdown table; ratios are the comparable figures on a shared machine.
"""
import argparse
import gzip
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from llamacpp import greedy_next, is_end

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("ARBOR_MODELS", Path.home() / ".cache" / "arbor" / "models"))
TARGET_FILE = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"


def prompts(path, limit):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["prompt"] for r in rows[:limit]]


def llama_cpp_plain(path, texts, max_tokens, threads):
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    gen, secs, made = 0, 0.0, 0
    for text in texts:
        llm.reset()
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        llm.eval(ids)
        tok = greedy_next(llm)
        t0 = time.perf_counter()
        n = 1
        while n < max_tokens and not is_end(llm, tok):
            llm.eval([tok])
            tok = greedy_next(llm)
            n += 1
        secs += time.perf_counter() - t0
        gen += n - 1
        made += n
    return gen / secs, made


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tree", default="auto")
    ap.add_argument("--prompts", default=str(ROOT / "bench" / "prompts" / "humaneval.jsonl.gz"))
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arbor", default=str(ROOT / "target" / "release" / "arbor"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json-dir", help="keep each round's `arbor bench` JSON here")
    a = ap.parse_args()
    texts = prompts(a.prompts, a.limit)
    llama_cpp_plain(MODELS_DIR / TARGET_FILE, texts[:1], 8, a.threads)  # warm the page cache
    rows = []
    for _ in range(a.rounds):
        # llama.cpp right before and right after Arbor's run: on a shared host the load moves
        # within minutes, and bracketing keeps the two sides' conditions alike.
        before, made = llama_cpp_plain(MODELS_DIR / TARGET_FILE, texts, a.max_tokens, a.threads)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "spec.json"
            subprocess.run([a.arbor, "bench", "--target", a.target, "--draft", a.draft,
                            "--tree", a.tree, "--prompts", a.prompts, "--limit", str(a.limit),
                            "--max-tokens", str(a.max_tokens), "--json", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            o = json.loads(out.read_text())["overall"]
            if a.json_dir:
                Path(a.json_dir).mkdir(parents=True, exist_ok=True)
                (Path(a.json_dir) / f"round{len(rows) + 1}.json").write_text(out.read_text())
        after, _ = llama_cpp_plain(MODELS_DIR / TARGET_FILE, texts, a.max_tokens, a.threads)
        rows.append((o, (before + after) / 2, made))
    o, _, made = rows[0]
    print(f"{a.threads} threads, {a.limit} prompts of {a.prompts}, up to {a.max_tokens} new "
          f"tokens, greedy, tree {a.tree}, draft {a.draft}; tokens generated: Arbor spec "
          f"{o['generated_tokens']}, Arbor plain {o['plain_generated_tokens']}, llama.cpp {made}\n")
    print("| Arbor spec tok/s | τ | Arbor plain tok/s | llama.cpp plain tok/s "
          "| spec / Arbor plain | spec / llama.cpp |")
    print("|---:|---:|---:|---:|---:|---:|")
    for o, llama, _ in rows:
        print(f"| {o['spec_tokens_per_sec']:.2f} | {o['tau']:.2f} | "
              f"{o['plain_tokens_per_sec']:.2f} | {llama:.2f} "
              f"| {o['spec_tokens_per_sec'] / o['plain_tokens_per_sec']:.2f}× "
              f"| {o['spec_tokens_per_sec'] / llama:.2f}× |")
    if len(rows) > 1:
        own = np.median([o["spec_tokens_per_sec"] / o["plain_tokens_per_sec"] for o, _, _ in rows])
        vs = np.median([o["spec_tokens_per_sec"] / llama for o, llama, _ in rows])
        print(f"\nmedian of {len(rows)} rounds: spec / Arbor plain {own:.2f}×, "
              f"spec / llama.cpp {vs:.2f}×")

if __name__ == "__main__":
    main()
