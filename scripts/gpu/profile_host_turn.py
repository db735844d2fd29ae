# ruff: noqa: E501
"""Where the host's turn between two batch-1 decode steps goes (issue 14: the ~0.08 ms of a 4.7 ms
step that the GPU waits for the host), on the GPU machine: a resident Llama-3-8B-shape worker at a
1k context, wall time per step against the decode graph's own GPU time, then cProfile over 300
steps (the top functions by own time). Writes $OUT/host_turn.txt.

    python3 scripts/gpu/profile_host_turn.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
from pathlib import Path

from aioffload.bench import common
from aioffload.bench.attention_kernels import time_cuda
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.config import EngineConfig, SchedulerConfig


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    args = p.parse_args()
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    cfg = EngineConfig(model=str(path), device="cuda", scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=4096)).validate()
    worker = common.build_worker(cfg)
    prompt = common.random_prompts(1, 1000, worker.model_config.vocab_size, seed=3)[0]
    d = common.StepDriver(worker, [prompt], max_new_tokens=400)
    d.prefill()
    for _ in range(5):
        d.decode()
    walls = sorted(d.decode() for _ in range(41))
    g = worker.graphs.graphs[1]
    gpu = time_cuda(lambda: [g.replay() for _ in range(20)], 3) / 20
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        d.decode()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    head = f"wall p50 {walls[20] * 1e3:.3f} ms, graph GPU {gpu * 1e3:.3f} ms, host turn ~{(walls[20] - gpu) * 1e6:.0f} us a step\n"
    out = Path(os.environ.get("OUT", "/tmp/out"), "host_turn.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + s.getvalue())
    print(head + "\n".join(s.getvalue().splitlines()[:40]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
