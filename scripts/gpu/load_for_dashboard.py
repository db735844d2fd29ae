"""A plain load for the dashboard recording on the GPU machine (no Locust there): N concurrent
streaming completions of random token prompts, each replaced when it finishes, for SECONDS.

    python scripts/gpu/load_for_dashboard.py http://127.0.0.1:8000 64 60
Prints requests, tokens and output tok/s.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, url: str, rng: random.Random) -> int:
    body = {"prompt": [rng.randrange(10, 120000) for _ in range(rng.randrange(32, 256))],
            "max_tokens": rng.randrange(32, 128), "temperature": 0.8, "ignore_eos": True, "stream": True}  # fmt: skip
    tokens = 0
    async with client.stream("POST", url, json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                tokens += bool(json.loads(line[6:]).get("choices"))
    return tokens


async def main(base: str, users: int, seconds: float) -> None:
    url, rng, end = f"{base}/v1/completions", random.Random(0), time.monotonic() + seconds
    totals = {"requests": 0, "tokens": 0}

    async def user(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            totals["tokens"] += await one(client, url, rng)
            totals["requests"] += 1

    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    t = time.monotonic()
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(user(client) for _ in range(users)))
    dt = time.monotonic() - t
    print(json.dumps({**totals, "seconds": round(dt, 1), "output_tok_s": round(totals["tokens"] / dt, 1)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
