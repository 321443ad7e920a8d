#!/usr/bin/env python3
"""Simulates chain speculation with and without growth gates from two models' own predictions.

    pip install llama-cpp-python==0.3.36 numpy
    python3 scripts/sim-growth-gates.py [--limit 24] [--verify 1:31,2:37.6,4:50,8:86.6,16:154]
                                        [--draft-ms 13] [--root-ms 15.5]

The target (Qwen2.5-Coder-1.5B Q4_K_M) decodes each HumanEval prompt greedily (≤ 128 tokens);
the draft (the 0.5B) then reads prompt + continuation once, giving at every position its top
token and that token's probability given the true prefix. Greedy chain speculation is fully
determined by these: a chain from position j is accepted while the draft's top tokens equal the
target's. Steps are priced with a verify-cost curve (ms by nodes, e.g. from `arbor bench
--verify-curve`) and a draft level cost; the script prints the draft's calibration (acceptance
by confidence), fixed chains, constant confidence thresholds, and the cost rule Arbor's
`auto` uses (grow while path probability × ᾱ / (draft level + extra verify) ≥ rate R).
"""
import argparse
import gzip
import json
import os
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from llamacpp import greedy_next, is_end

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ARBOR_MODELS", Path.home() / ".cache" / "arbor" / "models"))


def collect(limit, max_tokens):
    rows = [json.loads(line) for line in gzip.open(ROOT / "bench/prompts/humaneval.jsonl.gz", "rt")
            if line.strip()][:limit]
    target = Llama(model_path=str(MODELS / "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"), n_ctx=2048,
                   n_threads=2, n_batch=512, verbose=False)
    draft = Llama(model_path=str(MODELS / "Qwen2.5-Coder-0.5B-Instruct.gguf"), n_ctx=2048,
                  n_threads=2, n_batch=512, verbose=False, logits_all=True)
    out = []
    for r in rows:
        target.reset()
        ids = target.tokenize(r["prompt"].encode(), add_bos=False, special=False)
        target.eval(ids)
        gen = [greedy_next(target)]
        while not is_end(target, gen[-1]) and len(gen) < max_tokens:
            target.eval([gen[-1]])
            gen.append(greedy_next(target))
        draft.reset()
        draft.eval(ids + gen)
        rec = []
        for j, tok in enumerate(gen):
            s = np.array(draft.scores[len(ids) - 1 + j], dtype=np.float64)
            p = np.exp(s - s.max())
            p /= p.sum()
            top = int(np.argmax(p))
            rec.append((top == tok, float(p[top])))
        out.append(rec)
    return out


def simulate(data, verify, draft_ms, root_ms, depth, stop):
    """Tokens per second of greedy chains up to `depth` that stop growing when
    `stop(path_prob, level)` says so."""
    secs, tokens = 0.0, 0
    for rec in data:
        j, full = 0, False
        while j < len(rec):
            t, cum, chain = 0.0, 1.0, []
            for level in range(depth):
                if j + level >= len(rec):
                    break
                t += root_ms if (level == 0 and full) else draft_ms
                ok, p = rec[j + level]
                chain.append(ok)
                cum *= p
                if stop(cum, level + 1):
                    break
            accepted = 0
            while accepted < len(chain) and chain[accepted]:
                accepted += 1
            full = accepted == len(chain)
            t += verify(len(chain) + 1)
            secs += t / 1000
            tokens += min(accepted + 1, len(rec) - j)
            j += accepted + 1
    return tokens / secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--verify", default="1:31,2:37.6,4:50,8:86.6,16:154")
    ap.add_argument("--draft-ms", type=float, default=13.0)
    ap.add_argument("--root-ms", type=float, default=15.5)
    a = ap.parse_args()
    curve = [tuple(float(x) for x in p.split(":")) for p in a.verify.split(",")]

    def verify(n):
        for (n0, t0), (n1, t1) in zip(curve, curve[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = curve[-2], curve[-1]
        return t1 + (t1 - t0) * (n - n1) / (n1 - n0)

    data = collect(a.limit, a.max_tokens)
    flat = [x for rec in data for x in rec]
    print("draft calibration (top-token probability → acceptance):")
    for lo, hi in [(0, .4), (.4, .6), (.6, .8), (.8, .95), (.95, .99), (.99, 1.01)]:
        sel = [ok for ok, p in flat if lo <= p < hi]
        if sel:
            print(f"  [{lo:.2f}, {hi:.2f}): {len(sel):5d} positions, accepted {np.mean(sel):.3f}")
    plain = 1000 / verify(1)
    print(f"plain: {plain:.1f} tok/s")
    for k in range(1, 8):
        r = simulate(data, verify, a.draft_ms, a.root_ms, k, lambda c, l: False)
        print(f"chain:{k}: {r:.1f} tok/s ({r / plain:.3f}× plain)")
    for th in [0.5, 0.6, 0.7, 0.8, 0.9]:
        r = simulate(data, verify, a.draft_ms, a.root_ms, 8, lambda c, l, th=th: c < th)
        print(f"depth ≤ 8, stop below path probability {th}: {r:.1f} tok/s ({r / plain:.3f}×)")
    alpha = np.mean([ok for ok, _ in flat])
    for rate in [25, 30, 35, 40, 45]:
        def stop(c, level, rate=rate):
            cost = a.draft_ms + verify(level + 2) - verify(level + 1)
            return c * alpha / (cost / 1000) < rate
        r = simulate(data, verify, a.draft_ms, a.root_ms, 8, stop)
        print(f"depth ≤ 8, cost rule at R = {rate} tok/s: {r:.1f} tok/s ({r / plain:.3f}×)")


if __name__ == "__main__":
    main()
