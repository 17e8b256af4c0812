"""`lmforge serve` under load: 1, 4, 16, 64 concurrent streaming clients on loopback against sequential requests.

Starts `lmforge serve` as a process, then for each concurrency C runs C clients, each sending `--per-client`
streaming completions one after another (bounded count, and each client stops at `--time-limit`). Reports
aggregate generated tokens/s, p50/p99 time to first token and per-token latency (gaps between streamed
chunks), and the ratio to concurrency 1 (sequential requests). Every request is counted: each must come back
exactly once, complete, with a distinct id, and the server's own request counter must agree. Then the server's
resident memory is sampled over `--memory-requests` short requests (16 at a time).

    python benchmarks/serve.py                      # SmolLM2-135M, dtype auto, 32 new tokens
    python benchmarks/serve.py --memory-requests 200 --per-client 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from common import host  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short story about a robot who learns to paint.",
           "List three uses of copper:", "In 1969, astronauts", "The best way to learn a language is",
           "Explain continuous batching in one paragraph.", "Once upon a time", "A haiku about the sea:"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    times, rid, usage, finish = [], None, None, None
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk["id"]
            if chunk["choices"]:
                times.append(time.perf_counter())
                finish = chunk["choices"][0]["finish_reason"] or finish
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"id": rid, "ttft": times[0] - start if times else float("nan"),
            "gaps": [b - a for a, b in zip(times, times[1:], strict=False)], "tokens": usage["completion_tokens"],
            "finish": finish}


async def load(url: str, model: str, clients: int, per_client: int, max_tokens: int, time_limit: float) -> dict:
    deadline = time.perf_counter() + time_limit
    results: list[dict] = []
    sent = 0

    async def worker(w: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(timeout=600) as client:
            for k in range(per_client):
                if time.perf_counter() > deadline:
                    return
                sent += 1
                results.append(await one_request(client, url, model, PROMPTS[(w + k) % len(PROMPTS)], max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - start
    ids = [r["id"] for r in results]
    assert len(results) == sent and len(set(ids)) == len(ids) and None not in ids, "a request was lost or repeated"
    assert all(r["finish"] in ("stop", "length") for r in results), "a request did not finish"
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": pct([r["ttft"] for r in results], 0.5), "ttft_p99": pct([r["ttft"] for r in results], 0.99),
            "tpot_p50": pct(gaps, 0.5), "tpot_p99": pct(gaps, 0.99)}


def server_requests(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('lmforge_requests_total{route="/v1/completions",status="200"}')))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--sequential", type=int, default=8, help="requests of the sequential baseline (1 client)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=300, help="clients send no new request after this (s)")
    p.add_argument("--memory-requests", type=int, default=1000)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", args.model, "--dtype",
                             args.dtype, "--port", str(port), "--max-batch", str(max(levels)), "--max-queue",
                             "256", "--context", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None:
                    raise SystemExit("lmforge serve exited") from None
                time.sleep(0.1)
        print(f"host: {host()}")
        print(f"model {args.model}, dtype {args.dtype}, {args.max_tokens} new tokens per request, greedy, "
              f"{args.per_client} requests per client ({args.sequential} for the sequential baseline)")
        asyncio.run(load(url, args.model, 1, 1, args.max_tokens, 60))  # warm-up
        before = server_requests(url)
        rows, sent = [], 0
        for c in levels:
            per_client = args.sequential if c == 1 else args.per_client
            r = asyncio.run(load(url, args.model, c, per_client, args.max_tokens, args.time_limit))
            rows.append(r)
            sent += r["requests"]
        counted = server_requests(url) - before
        base = rows[0]["tok_s"] if levels[0] == 1 else float("nan")
        print("| clients | requests | tokens | wall s | tokens/s | x sequential | TTFT p50 / p99 ms | "
              "per-token p50 / p99 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                  f"{r['tok_s'] / base:.2f} | {1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | "
                  f"{1e3 * r['tpot_p50']:.0f} / {1e3 * r['tpot_p99']:.0f} |")
        print(f"requests sent {sent}, answered once each with distinct ids, server counted {counted}: "
              f"{'OK' if counted == sent else 'MISMATCH'}")
        if args.memory_requests:
            marks, done = [], 0
            step = max(args.memory_requests // 4, 16)
            marks.append((0, rss_mib(proc.pid)))
            while done < args.memory_requests:
                n = min(step, args.memory_requests - done)
                asyncio.run(load(url, args.model, 16, -(-n // 16), 4, 3600))
                done += 16 * -(-n // 16)
                marks.append((done, rss_mib(proc.pid)))
            print("server RSS over short requests (4 tokens, 16 clients): "
                  + ", ".join(f"{n}: {m:.0f} MiB" for n, m in marks)
                  + f"; growth after the first block {marks[-1][1] - marks[1][1]:+.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
