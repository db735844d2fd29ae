"""Decoding requests' inter-token latency while a long prompt prefills, through the real Engine
(scheduler prefill sizing included): `streams` requests decode; after `tokens` of theirs are
timed, a `prompt_len`-token prompt arrives; the gaps between their outputs that end between
its arrival and its first token are the ITL "during", those before it the ITL "alone"."""

from __future__ import annotations

import asyncio
import time

from aioffload.bench import common
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker

STREAM_PROMPT = 32
STREAM_ROOM = 512  # output tokens a stream may make: the timed ones, plus one per step of the prefill
WARMUP_TOKENS = 4  # each stream's first outputs (its own prefill, graph warm-up) are not timed


async def itl_under_prefill(worker: Worker, streams: int, prompt_len: int, tokens: int) -> dict:
    from aioffload.checkpoint.tokenizer import Tokenizer
    from aioffload.engine.async_engine import Engine

    engine = Engine(worker.config, worker, Tokenizer.from_dir(worker.config.model), "bench")
    vocab = worker.model_config.vocab_size
    prompts = common.random_prompts(streams, STREAM_PROMPT, vocab, seed=11)
    long_prompt = common.random_prompts(1, prompt_len, vocab, seed=12)[0]
    params = SamplingParams(max_tokens=STREAM_ROOM, temperature=0.0, ignore_eos=True)
    events: list[list[float]] = [[] for _ in range(streams)]  # output arrival times per stream
    stop = asyncio.Event()

    async def stream(i: int) -> None:
        gen = engine.generate(prompts[i], params, f"itl-{i}")
        try:
            async for _ in gen:
                events[i].append(time.perf_counter())
                if stop.is_set():
                    break
        finally:
            await gen.aclose()

    async def until(enough: int, tasks: list[asyncio.Task[None]]) -> None:
        while min(len(e) for e in events) < enough:
            if any(t.done() for t in tasks):  # a stream ended early: surface its error
                for t in tasks:
                    if t.done():
                        t.result()
                raise RuntimeError("a decoding stream ended before the measurement")
            await asyncio.sleep(0.002)

    try:
        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        await until(WARMUP_TOKENS + tokens, tasks)
        arrived = time.perf_counter()
        first = None
        async for _ in engine.generate(long_prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                       "itl-long"):  # fmt: skip
            first = time.perf_counter()
        assert first is not None
        await until(max(len(e) for e in events) + 2, tasks)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await engine.shutdown(1.0)
    alone, during = [], []
    for e in events:
        for a, b in zip(e[WARMUP_TOKENS:], e[WARMUP_TOKENS + 1 :]):
            if b <= arrived:
                alone.append(b - a)
            elif b <= first + 1e-3:  # the step that finished the prompt also carried their tokens
                during.append(b - a)
    a_ms, d_ms = common.summarize(alone, 1e3), common.summarize(during, 1e3)
    return {"streams": streams, "prompt_len": prompt_len, "ttft_ms": round((first - arrived) * 1e3, 2),
            "alone_ms": a_ms, "during_ms": d_ms, "gaps_alone": len(alone), "gaps_during": len(during),
            "p99_ratio": round(d_ms["p99"] / a_ms["p99"], 3) if alone and during else None}  # fmt: skip
