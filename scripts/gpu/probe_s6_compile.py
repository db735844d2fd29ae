# ruff: noqa: E501
"""Fifth session: which Triton kernels the offloaded (or, --resident, the resident) worker's first mixed step compiles (the cold ITL
round's 0.9-2.0 s step, issue 14). A fresh TRITON_CACHE_DIR, Triton's post-compile hook, and the
offloaded worker of `bench prefill`: each phase's new in-process compiles are counted, and those of
the first ITL round are printed (kernel, constants, specialization). Run with
TRITON_CACHE_DIR=$(mktemp -d).

    python3 scripts/gpu/probe_s6_compile.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from triton import knobs

from aioffload.bench import common
from aioffload.bench.itl_under_prefill import itl_under_prefill
from aioffload.bench.offload import emulated_offload
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import EngineConfig, OffloadConfig, SchedulerConfig

SEEN: list[tuple[float, str, str]] = []


def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # type: ignore[no-untyped-def]  # noqa: A002
    consts = {k: v for k, v in compile["constants"].items()}
    SEEN.append((time.perf_counter(), repr.split("(")[0], f"{consts} | {str(key[1])[:400]}"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    p.add_argument("--resident", action="store_true", help="the resident worker (CUDA graphs) instead")
    args = p.parse_args()
    knobs.runtime.jit_post_compile_hook = hook
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    base = EngineConfig(model=str(path), device="cuda", offload=OffloadConfig(hybrid="off"),
                        scheduler=SchedulerConfig(max_num_seqs=64, max_model_len=8192)).validate()
    mcfg = Checkpoint.open(str(path)).model_config
    worker = common.build_worker(base if args.resident else emulated_offload(base, mcfg, 2, 6.0, None))
    print(f"start-up: {len(SEEN)} compiles")
    n = len(SEEN)
    vocab = mcfg.vocab_size
    common.StepDriver(worker, common.random_prompts(1, 2000, vocab, seed=99), 1).prefill()
    common.StepDriver(worker, common.random_prompts(1, 8000, vocab, seed=1), 1).prefill()
    d = common.StepDriver(worker, common.random_prompts(1, 1000, vocab, seed=7), 4)
    d.prefill(), d.decode(), d.decode()
    print(f"bench warm-up (2k, 8k prefill; 1k decode): {len(SEEN) - n} compiles")
    for i in range(2):
        n = len(SEEN)
        t = time.perf_counter()
        r = asyncio.run(itl_under_prefill(worker, 16, 8000, 4 if not args.resident else 24))
        print(f"ITL round {i}: {time.perf_counter() - t:.1f} s, ITL p99 alone {r['alone_ms']['p99']} during "
              f"{r['during_ms']['p99']} (p50 {r['during_ms']['p50']}, p90 {r['during_ms']['p90']}) ms; {len(SEEN) - n} compiles:")
        for _, name, what in SEEN[n:]:
            print(f"   {name}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
