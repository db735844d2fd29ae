# ruff: noqa: E501
"""Fifth session: why the offloaded ITL-under-prefill run of GPU call 1 had one 1139 ms step (issue 14).
The offloaded worker of `bench prefill` (24 GB emulation, --hybrid off), the same warm-up, then the
16-stream ITL run three times: as committed, with the sampling tensors built unpinned (as before
this session), and as committed again; every step's (requests, tokens, proposals, seconds) printed.

    python3 scripts/gpu/probe_s6_itl.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from aioffload.bench import common
from aioffload.bench.itl_under_prefill import itl_under_prefill
from aioffload.bench.offload import emulated_offload
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import EngineConfig, OffloadConfig, SchedulerConfig
from aioffload.engine import async_engine
from aioffload.worker import sampling


def _triton_entries() -> int:
    root = Path.home() / ".triton" / "cache"
    return sum(1 for _ in root.iterdir()) if root.exists() else 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    args = p.parse_args()
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    base = EngineConfig(model=str(path), device="cuda", offload=OffloadConfig(hybrid="off"),
                        scheduler=SchedulerConfig(max_num_seqs=64, max_model_len=8192)).validate()
    mcfg = Checkpoint.open(str(path)).model_config
    worker = common.build_worker(emulated_offload(base, mcfg, 2, 6.0, None))
    vocab = mcfg.vocab_size
    common.StepDriver(worker, common.random_prompts(1, 2000, vocab, seed=99), 1).prefill()
    common.StepDriver(worker, common.random_prompts(1, 8000, vocab, seed=1), 1).prefill()
    steps: list[tuple] = []
    real = async_engine.Engine._record_step

    def record(self, plan, seconds):  # type: ignore[no-untyped-def]
        steps.append((len(plan.requests), plan.total_tokens, sum(plan.num_spec_tokens.values()), round(seconds * 1e3, 1), time.perf_counter()))
        return real(self, plan, seconds)

    async_engine.Engine._record_step = record  # type: ignore[method-assign]
    pinned_build = sampling.SamplingTensors.build.__func__  # type: ignore[attr-defined]

    def unpinned(cls, params, seeds, steps_, device):  # type: ignore[no-untyped-def]
        def put(values, dtype):  # type: ignore[no-untyped-def]
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
        return cls(temperature=put([q.temperature for q in params], torch.float32), top_k=put([q.top_k for q in params], torch.int64),
                   top_p=put([q.top_p for q in params], torch.float32), seed=put([(s + 2**63) % 2**64 - 2**63 for s in seeds], torch.int64),
                   step=put(list(steps_), torch.int64), all_greedy=all(q.is_greedy for q in params))

    for name, build in (("pinned", pinned_build), ("unpinned", unpinned), ("pinned again", pinned_build)):
        sampling.SamplingTensors.build = classmethod(build)  # type: ignore[method-assign]
        steps.clear()
        m0, t0 = torch.cuda.memory_stats(), _triton_entries()
        r = asyncio.run(itl_under_prefill(worker, 16, 8000, 12))
        m1, t1 = torch.cuda.memory_stats(), _triton_entries()
        print(f"{name}: alloc retries +{m1['num_alloc_retries'] - m0['num_alloc_retries']}, device mallocs "
              f"+{m1['num_device_alloc'] - m0['num_device_alloc']}, frees +{m1['num_device_free'] - m0['num_device_free']}, "
              f"reserved {m1['reserved_bytes.all.current'] / 1e9:.2f} GB, Triton cache entries +{t1 - t0}")
        big = [s for s in steps if s[1] > 64 or s[3] > 300]
        print(f"{name}: ITL p99 alone {r['alone_ms']['p99']} during {r['during_ms']['p99']} ms ({r['p99_ratio']}x), TTFT {r['ttft_ms']} ms")
        print("   steps with > 64 tokens or > 300 ms (requests, tokens, proposals, ms):", [s[:4] for s in big])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
