"""Speculative decoding on CUDA: Triton attention over verification rows, CUDA graphs for the plain
decode steps in between, the copy-stream offload path, and the draft model on the device.

Marked `gpu` and skipped without CUDA; run on the GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig, SpeculativeConfig
from aioffload.engine.async_engine import Engine
from aioffload.worker.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]
DEMO = DEMO_MODEL
PROMPTS = [
    "The list. The list is a list. The list",
    "def f(x):\n    return x + 1\n\ndef f(x):\n    return",
    "Python is a programming language. Python is a",
    "A module is a file containing Python definitions and statements. A module is a",
]


def outputs(method: str, params: SamplingParams, draft: str | None = None, **offload: object) -> tuple[list, dict]:
    cfg = EngineConfig(
        model=DEMO, device="cuda", cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=64),
        offload=OffloadConfig(**offload),  # type: ignore[arg-type]
        speculative=SpeculativeConfig(method=method, draft_model=draft),
    ).validate()  # fmt: skip
    engine = Engine.from_config(cfg)
    if engine.speculation is not None:  # k from acceptance alone (the tiny eager draft costs what the target does)
        engine.speculation.draft_step_s = 0.0

    async def one(i: int, p: str) -> list[int]:
        return [t async for out in engine.generate(p, params, f"r{i}") for t in out.token_ids]

    async def go() -> list[list[int]]:
        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))
        finally:
            await engine.shutdown(1.0)

    tokens = asyncio.run(go())
    assert engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks
    return tokens, engine.stats() | {"graphs": engine.worker.graphs is not None}


GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def test_greedy_with_prompt_lookup_and_a_draft_equals_off_with_graphs_on() -> None:
    want, off = outputs("off", GREEDY)
    assert off["graphs"] is True
    got, s = outputs("ngram", GREEDY)
    assert got == want and s["spec_accepted_tokens_total"] > 0
    got, s = outputs("draft", GREEDY, DEMO)
    assert got == want
    assert s["spec_accepted_tokens_total"] >= 0.95 * s["spec_proposed_tokens_total"] > 0  # the target itself


def test_offloaded_prompt_lookup_on_the_copy_stream_equals_off() -> None:
    want, _ = outputs("off", GREEDY)
    got, s = outputs("auto", GREEDY, cpu_offload_gb=0.005)  # auto: offload is active, so prompt lookup
    assert got == want and s["offload_bytes_per_step"] > 0 and s["spec_proposed_tokens_total"] > 0


def test_sampled_prompt_lookup_gives_the_plain_tokens_for_a_seed() -> None:
    params = SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, seed=3, ignore_eos=True)
    assert outputs("ngram", params)[0] == outputs("off", params)[0]
