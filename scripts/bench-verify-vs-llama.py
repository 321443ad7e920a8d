#!/usr/bin/env python3
"""The cost of verifying a tree of n nodes — one forward over n new tokens after a prompt —
in Arbor and in llama.cpp, side by side in one run, on the same GGUF file.

    cargo build --release -p arbor-server
    pip install llama-cpp-python==0.3.36 numpy
    python3 scripts/bench-verify-vs-llama.py [--nodes 1,2,4,8,16] [--repeats 5]

Arbor: `arbor bench --verify-curve --verify-nodes N.. --json` (a chain of n nodes after a
`--prompt-tokens` synthetic prompt, every node's logits copied to the host, fastest of
`--repeats`). llama.cpp (llama-cpp-python): the same prompt length evaluated, then n more
tokens in one batch with logits for every one of them (`logits_all`, as a verifier needs),
fastest of `--repeats`. Prints a Markdown table: each engine's time and its ratio to its own
one-token step — the figure that says how large a tree pays on this machine.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("ARBOR_MODELS", Path.home() / ".cache" / "arbor" / "models"))
TARGET_FILE = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"


def llama_cpp_curve(path, nodes, prompt_tokens, repeats, threads):
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                n_batch=512, logits_all=True, verbose=False)
    text = b"def quicksort(items):\n    return sorted(items)\n" * 64
    prompt = llm.tokenize(text, add_bos=False)[:prompt_tokens]
    curve = {}
    for n in nodes:
        best = float("inf")
        for _ in range(repeats):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            llm.eval(prompt[:n])
            best = min(best, time.perf_counter() - t0)
        curve[n] = best
    return curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--nodes", default="1,2,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arbor", default=str(ROOT / "target" / "release" / "arbor"))
    a = ap.parse_args()
    nodes = [int(n) for n in a.nodes.split(",")]
    if nodes[0] != 1:
        raise SystemExit("--nodes must start at 1 (the ratios are to one node)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "curve.json"
        subprocess.run([a.arbor, "bench", "--verify-curve", "--model", a.model,
                        "--verify-nodes", a.nodes, "--prompt-tokens", str(a.prompt_tokens),
                        "--repeats", str(a.repeats), "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        arbor = {p["nodes"]: p["secs"] for p in json.loads(out.read_text())["points"]}
    llama = llama_cpp_curve(MODELS_DIR / TARGET_FILE, nodes, a.prompt_tokens, a.repeats,
                            a.threads)
    print(f"{a.threads} threads, {a.prompt_tokens}-token prompt, fastest of {a.repeats}\n")
    print("| nodes | Arbor ms | × Arbor 1 node | llama.cpp ms | × llama.cpp 1 node "
          "| Arbor / llama.cpp |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in nodes:
        print(f"| {n} | {arbor[n] * 1e3:.1f} | {arbor[n] / arbor[1]:.2f} | "
              f"{llama[n] * 1e3:.1f} | {llama[n] / llama[1]:.2f} | {arbor[n] / llama[n]:.2f} |")


if __name__ == "__main__":
    main()
