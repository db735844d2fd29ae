"""Offline throughput: N concurrent requests through the real Engine (scheduler, batching, offload).

Prompts are random token ids (fixed seed); every request ignores EOS, so it makes exactly
--output-len tokens. One short warm-up request runs first, untimed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import TYPE_CHECKING

import torch

from aioffload.bench import common
from aioffload.bench.common import say
from aioffload.config import EngineConfig
from aioffload.worker.sampling import SamplingParams

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine

NAME = "throughput"
TENSOR_PARALLEL = True  # one worker at a time: every rank builds its shard of it


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=256, help="requests, submitted at once (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: %(default)s)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompts (default: %(default)s)")
    common.add_synthetic_args(p)


async def measure_engine(engine: Engine, prompts: list[list[int]], output_len: int, warmup: bool = True) -> dict:
    """Submit every prompt at once (greedy, ignore_eos) and wait for all; returns the figures."""
    if warmup:
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(prompts[0][:8], params, "bench-warmup"):
            pass
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    steps0 = engine.stats()["steps_total"]

    async def one(i: int, prompt: list[int]) -> int:
        n = 0
        async for out in engine.generate(prompt, params, f"bench-{i}"):
            n += len(out.token_ids)
        return n

    t = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - t
    out_tokens, in_tokens = sum(counts), sum(len(p) for p in prompts)
    return {
        "num_prompts": len(prompts),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "output_tok_s": round(out_tokens / elapsed, 1),
        "total_tok_s": round((in_tokens + out_tokens) / elapsed, 1),
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "all_full_length": all(c == output_len for c in counts),
        "steps": engine.stats()["steps_total"] - steps0,
    }


async def _run_engine(config: EngineConfig, prompts: list[list[int]], output_len: int) -> dict:
    from aioffload.engine.async_engine import Engine

    engine = Engine.from_config(config)
    try:
        figures = await measure_engine(engine, prompts, output_len)
        figures["offload_active"] = engine.worker.offload_active
        figures["device"] = common.device_name(engine.worker.device)
        return figures
    finally:
        await engine.shutdown(1.0)


def run(config: EngineConfig, args: argparse.Namespace) -> int:
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    config = common.resolve_model(config, args)
    from aioffload.checkpoint.checkpoint import Checkpoint

    vocab = Checkpoint.open(config.model).model_config.vocab_size
    prompts = common.random_prompts(args.num_prompts, args.input_len, vocab, args.prompt_seed)
    say(f"throughput: {args.num_prompts} requests x ({args.input_len} prompt + {args.output_len} output) tokens, "
        f"max {config.scheduler.max_num_seqs} sequences per step")  # fmt: skip
    figures = asyncio.run(_run_engine(config, prompts, args.output_len))
    result = {"bench": NAME, "model": config.model, "torch": torch.__version__, "input_len": args.input_len,
              "output_len": args.output_len, **figures}  # fmt: skip
    say(f"{figures['requests_per_s']:.2f} requests/s, {figures['output_tok_s']:.1f} output tok/s, "
        f"{figures['total_tok_s']:.1f} total tok/s in {figures['elapsed_s']:.2f} s")
    common.write_json("throughput.json", result)
    common.print_table([
        ["requests", "elapsed s", "req/s", "output tok/s", "total tok/s", "steps", "full length"],
        [figures["num_prompts"], figures["elapsed_s"], figures["requests_per_s"], figures["output_tok_s"],
         figures["total_tok_s"], figures["steps"], figures["all_full_length"]],
    ])  # fmt: skip
    return 0 if figures["all_full_length"] else 1
