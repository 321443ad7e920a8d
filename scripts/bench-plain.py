#!/usr/bin/env python3
"""Plain-decoding speed, Arbor vs llama.cpp, side by side in one run on the same GGUF files.

    cargo build --release -p arbor-server
    pip install llama-cpp-python==0.3.36 numpy
    python3 scripts/bench-plain.py [--models smollm2-135m qwen2.5-coder-1.5b] [--threads 2]

For each model: `arbor bench --plain --json` (same prompt token ids reused for llama.cpp), then
llama.cpp through llama-cpp-python with the same thread count: prefill tokens/s over the
prompt and decode tokens/s over greedy tokens (argmax, EOS ignored). Prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from llamacpp import greedy_next

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("ARBOR_MODELS", Path.home() / ".cache" / "arbor" / "models"))
FILES = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct.gguf",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
}


def llama_cpp(path, prompt, gen, threads, repeats):
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + gen + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    pre, dec = [], []
    for run in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = greedy_next(llm)
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([tok])
            tok = greedy_next(llm)
        t2 = time.perf_counter()
        if run > 0:
            pre.append(len(prompt) / (t1 - t0))
            dec.append((gen - 1) / (t2 - t1))
    return float(np.mean(pre)), float(np.mean(dec))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arbor", default=str(ROOT / "target" / "release" / "arbor"))
    a = ap.parse_args()
    rows = []
    for name in a.models:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
            subprocess.run([a.arbor, "bench", "--plain", "--model", name,
                            "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
                            "--repeats", str(a.repeats), "--json", out.name], check=True, env=env)
            ours = json.loads(Path(out.name).read_text())
        pre, dec = llama_cpp(MODELS_DIR / FILES[name], ours["prompt"], a.gen_tokens, a.threads, a.repeats)
        rows.append((name, ours["prefill_tokens_per_sec"], pre, ours["decode_tokens_per_sec"], dec))
    print(f"\n{a.threads} threads, {a.prompt_tokens}-token prompt, {a.gen_tokens} generated tokens, "
          f"mean of {a.repeats} runs after a warm-up\n")
    print("| model | Arbor prefill tok/s | llama.cpp prefill tok/s | ratio | Arbor decode tok/s | llama.cpp decode tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ap_, lp, ad, ld in rows:
        print(f"| {name} | {ap_:.1f} | {lp:.1f} | {ap_ / lp:.2f}× | {ad:.2f} | {ld:.2f} | {ad / ld:.2f}× |")


if __name__ == "__main__":
    main()
