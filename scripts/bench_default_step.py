"""CPU decode-step time of requests that use no logprobs, penalties, masks or n > 1 (issue 13's
"no step slows down" check). Drives `Engine.generate` on the demo model and times each decode-only
`_run_step` (schedule -> worker -> tokens, the part issue 13 touches), per batch size and sampler.

    PYTHONPATH=. python scripts/bench_default_step.py [--rounds 5] [--tokens 48] [--fake-worker]

--fake-worker replaces the model step by an instant stand-in (tokens from the positions): what is
left is the engine's own per-step cost (scheduling, worker inputs, delivery, detokenization).

Prints, per (batch, sampler), the median decode step in microseconds: wall time, and CPU time of the
step's thread (less sensitive to other processes on a shared machine); and the process's CPU time per
generated token over whole rounds (the engine loop's scheduling and delivery included). Run it on the
code before and after a change, alternately: the figures are comparable only within one session.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, SchedulerConfig
from aioffload.engine.async_engine import Engine
from aioffload.worker.sampling import SamplingParams

_ids = itertools.count()
DEMO = DEMO_MODEL
SAMPLERS = {
    "greedy": SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    "sampled": SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True),
}


def make_engine() -> Engine:
    cfg = EngineConfig(
        model=DEMO, device="cpu",
        cache=CacheConfig(num_blocks=1024, block_size=16),
        scheduler=SchedulerConfig(max_model_len=512, max_num_batched_tokens=512, max_num_seqs=16),
    ).validate()  # fmt: skip
    return Engine.from_config(cfg)


def timed_steps(engine: Engine, batch: int, params: SamplingParams) -> tuple[list[float], list[float], float]:
    """(wall seconds, thread CPU seconds) of every decode-only step (all `batch` requests decoding) of
    one round, and the round's process CPU seconds per generated token."""
    times: list[float] = []
    cpu: list[float] = []
    run_step = engine._run_step

    def timed(plan, *more):  # noqa: ANN001, ANN002, ANN202
        t, c = time.perf_counter(), time.thread_time()
        out = run_step(plan, *more)
        if plan.total_tokens == batch and len(plan.requests) == batch:
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        return out

    engine._run_step = timed  # type: ignore[method-assign]
    c0 = time.process_time()

    async def one(i: int) -> None:
        async for _ in engine.generate(f"Once upon a time number {i} there", params, f"r{next(_ids)}"):
            pass

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(batch)))

    asyncio.run(main())
    per_token = (time.process_time() - c0) / (batch * params.max_tokens)
    engine._run_step = run_step  # type: ignore[method-assign]
    return times, cpu, per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--fake-worker", action="store_true", help="time the engine's own per-step work only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = make_engine()
    if args.fake_worker:
        from aioffload.worker.outputs import StepOutput

        def instant(chunks, params, seeds, steps, *rest, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            return StepOutput([[100 + (c.start + len(c.token_ids)) % 50] for c in chunks], [0] * len(chunks))

        engine.worker.execute = instant  # type: ignore[method-assign]
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        for name, base in SAMPLERS.items():
            params = dataclasses.replace(base, max_tokens=args.tokens)
            timed_steps(engine, batch, params)  # warm-up round
            steps: list[float] = []
            cpu: list[float] = []
            tok: list[float] = []
            for _ in range(args.rounds):
                w, c, t = timed_steps(engine, batch, params)
                steps += w
                cpu += c
                tok.append(t)
            fig = [statistics.median(steps) * 1e6, statistics.median(cpu) * 1e6, statistics.median(tok) * 1e6]
            results[f"b{batch}_{name}"] = [round(f, 1) for f in fig]
            print(f"batch {batch:2d} {name:8s}: decode step {fig[0]:8.1f} us wall, {fig[1]:8.1f} us CPU; "
                  f"{fig[2]:8.1f} us process CPU per token ({len(steps)} steps)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
