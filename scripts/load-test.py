#!/usr/bin/env python3
"""Load test for `arbor serve`: throughput and latency at several concurrency levels.

Streams requests (SSE, `stream_options.include_usage`) from a prompt set at each concurrency
level, with speculation on and/or off (Arbor's `speculate` request field), and reports per
level: output tokens/s over the level's wall time, p50/p99 time to first token (TTFT) and
p50/p99 inter-token latency (gap between consecutive content chunks as the client sees them;
tokens accepted together in one speculative step arrive together). Standard library only.

    python3 scripts/load-test.py --url http://127.0.0.1:8000 --concurrency 1,4,16 \
        --prompts bench/prompts/humaneval.jsonl.gz --max-tokens 64 --speculate on,off

Requests ask for exactly --max-tokens tokens (`ignore_eos`) unless --stop-at-eos lets them end
at the model's end of text.
"""

import argparse
import asyncio
import gzip
import json
import statistics
import sys
import time
from urllib.parse import urlparse


def load_prompts(path):
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out


def request_body(p, model, max_tokens, speculate, ignore_eos=True):
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
        "speculate": speculate,
    }
    if "messages" in p:
        body["messages"] = p["messages"]
        return "/v1/chat/completions", body
    if "turns" in p:
        body["messages"] = [{"role": "user", "content": p["turns"][0]}]
        return "/v1/chat/completions", body
    body["prompt"] = p["prompt"]
    return "/v1/completions", body


async def one(url, path, body):
    """Sends one streaming request; returns (ttft, [gaps], completion_tokens)."""
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    writer.write(head + data)
    await writer.drain()
    status = (await reader.readline()).decode()
    if " 200 " not in status:
        rest = await reader.read()
        raise RuntimeError(f"{status.strip()}: {rest[-300:]!r}")
    first, last, gaps, usage = None, None, [], 0
    async for raw in reader:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices", []):
            text = c.get("delta", {}).get("content") if "delta" in c else c.get("text")
            if text:
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
    writer.close()
    return first or 0.0, gaps, usage


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def level(args, prompts, conc, speculate):
    n = max(args.requests or 0, 2 * conc, 4)
    sem = asyncio.Semaphore(conc)
    results = []

    async def run(i):
        async with sem:
            path, body = request_body(
                prompts[i % len(prompts)], args.model, args.max_tokens, speculate, not args.stop_at_eos
            )
            results.append(await one(args.url, path, body))

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": conc,
        "speculate": speculate,
        "requests": n,
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_s": pct(gaps, 0.5),
        "itl_p99_s": pct(gaps, 0.99),
    }


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="model name (default: the server's first)")
    ap.add_argument("--prompts", default="bench/prompts/humaneval.jsonl.gz")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, help="requests per level (default 2 x concurrency, at least 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="let requests end at the model's end of text (default: ignore_eos, exactly --max-tokens each)",
    )
    ap.add_argument("--speculate", default="on,off", help="on, off or on,off")
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    if not args.model:
        u = urlparse(args.url)
        r, w = await asyncio.open_connection(u.hostname, u.port or 80)
        w.write(f"GET /v1/models HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode())
        raw = (await r.read()).decode()
        args.model = json.loads(raw.split("\r\n\r\n", 1)[1])["data"][0]["id"]
    prompts = load_prompts(args.prompts)
    rows = []
    print(f"{'run':<24} {'conc':>4} {'spec':>4} {'req':>4} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7}")
    for spec in [s == "on" for s in args.speculate.split(",")]:
        for conc in [int(c) for c in args.concurrency.split(",")]:
            r = await level(args, prompts, conc, spec)
            r["label"] = args.label
            rows.append(r)
            print(
                f"{args.label:<24} {conc:>4} {'on' if spec else 'off':>4} {r['requests']:>4} {r['tokens_per_s']:>7.1f} "
                f"{r['ttft_p50_s'] * 1000:>7.0f}ms {r['ttft_p99_s'] * 1000:>5.0f}ms "
                f"{r['itl_p50_s'] * 1000:>6.1f}ms {r['itl_p99_s'] * 1000:>5.0f}ms",
                flush=True,
            )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
