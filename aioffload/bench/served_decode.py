"""Batch-1 decode as a client sees it: one request through the real Engine (scheduler, step thread,
delivery, detokenization), its tokens' arrival times, with decode lookahead off and on in one run
(engine/lookahead.py). `StepDriver`'s step time leaves the host's turn between steps exposed; this
is the figure the server delivers."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from aioffload.bench import common
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker

SKIP_TOKENS = 8  # the first outputs (the prompt's prefill, a warm graph) are not timed


async def _one(worker: Worker, mode: str, prompt: list[int], tokens: int) -> dict:
    from aioffload.checkpoint.tokenizer import Tokenizer
    from aioffload.engine.async_engine import Engine

    sched = dataclasses.replace(worker.config.scheduler, lookahead=mode)
    engine = Engine(worker.config.replace(scheduler=sched), worker, Tokenizer.from_dir(worker.config.model), "bench")
    params = SamplingParams(max_tokens=tokens + SKIP_TOKENS, temperature=0.0, ignore_eos=True)
    arrivals: list[tuple[float, int]] = []  # (time, tokens so far)
    count = 0
    try:
        async for out in engine.generate(prompt, params, f"served-{mode}"):
            count += len(out.token_ids)
            arrivals.append((time.perf_counter(), count))
    finally:
        await engine.shutdown(5.0)
    timed = [(t, n) for t, n in arrivals if n >= SKIP_TOKENS]
    gaps = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(timed, timed[1:])]  # per token, merged outputs split
    span = (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])
    return {"lookahead": engine.lookahead, "tokens": timed[-1][1] - timed[0][1], "mean_ms": round(span * 1e3, 4),
            "gaps_ms": common.summarize(gaps, 1e3)}  # fmt: skip


def served_decode(worker: Worker, context: int, tokens: int) -> dict:
    """Per-token ITL of one greedy request at `context` tokens, lookahead off, then auto (the default)."""
    prompt = common.random_prompts(1, context, worker.model_config.vocab_size, seed=21)[0]
    out: dict = {"context": context}
    for mode in ("off", "auto"):
        out[mode] = asyncio.run(_one(worker, mode, prompt, tokens))
    return out
