# ruff: noqa: E501
"""Where a lone 32k prompt's one-chunk prefill still loses to the compute floor (issue 14, ninth
session), on the GPU machine. Prints a table last; writes $OUT/probe_s9_32k.json.

A resident synthetic Llama-3-8B worker built with a 32768-token budget (one chunk):
1. the dense matmul rate in a 5-call burst (the floor's) and for ~1 s (sustained);
2. 32000-token TTFT in one chunk with cuDNN's square padded to the worker's grain (8192: 32768
   rows) and to a 256-row grain (32000 rows exact);
3. the same with the forward cut to 31 layers (what skipping the last layer's rows that no logits
   read could give at most);
4. the one-chunk run's kernels under the profiler, by kind and by name.

    python3 scripts/gpu/probe_s9_32k.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from probe_long import kernel_sums  # scripts/gpu, this script's folder

from aioffload.bench import common
from aioffload.bench.prefill import SUSTAINED_REPS, compute_floor_s, long_context_view
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.config import EngineConfig, SchedulerConfig
from aioffload.worker.step_cost import measure_dense_flops

OUT = os.environ.get("OUT", "/tmp/out")


def ttft(worker, prompt: list[int], reps: int = 2) -> list[float]:  # type: ignore[no-untyped-def]
    return [round(common.StepDriver(worker, [prompt], max_new_tokens=1).prefill() * 1e3, 1) for _ in range(reps)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    args = p.parse_args()
    dev = torch.device("cuda")
    R: dict = {"torch": torch.__version__, "device": common.device_name(dev)}
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    path = long_context_view(str(path), 33000)
    cfg = EngineConfig(model=str(path), device="cuda",
                       scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=33000, max_num_batched_tokens=32768)).validate()  # fmt: skip
    t = time.perf_counter()
    worker = common.build_worker(cfg)
    R["build_s"] = round(time.perf_counter() - t, 1)
    mcfg = worker.model_config
    burst = measure_dense_flops(dev, torch.bfloat16, mcfg.hidden_size, mcfg.intermediate_size)
    sustained = measure_dense_flops(dev, torch.bfloat16, mcfg.hidden_size, mcfg.intermediate_size, reps=SUSTAINED_REPS)
    R.update(burst_tflops=round(burst / 1e12, 1), sustained_tflops=round(sustained / 1e12, 1))
    floor = compute_floor_s(mcfg, 32000, burst) * 1e3
    R["floor_ms"] = round(floor, 1)
    prompt = common.random_prompts(1, 32000, mcfg.vocab_size, seed=3)[0]
    common.StepDriver(worker, [prompt[:4096]], max_new_tokens=1).prefill()  # warm-up
    att = worker.attention
    R["grain_default"] = att.dense_grain
    R["ttft_grain_default"] = ttft(worker, prompt)
    print("grain", att.dense_grain, R["ttft_grain_default"], flush=True)
    att.dense_grain = 256
    R["ttft_grain_256"] = ttft(worker, prompt, 3)
    print("grain 256", R["ttft_grain_256"], flush=True)
    full = worker.model.cfg
    worker.model.cfg = dataclasses.replace(full, num_layers=full.num_layers - 1)
    R["ttft_grain_256_31_layers"] = ttft(worker, prompt)
    worker.model.cfg = full
    print("31 layers", R["ttft_grain_256_31_layers"], flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        common.StepDriver(worker, [prompt], max_new_tokens=1).prefill()
        torch.cuda.synchronize()
    kinds, names = kernel_sums(prof)
    R["profile_kinds_ms"] = kinds
    R["profile_top"] = [(n, round(v[0], 2), v[1]) for n, v in sorted(names.items(), key=lambda kv: -kv[1][0])[:30]]
    R["profile_total_ms"] = round(sum(v[0] for v in names.values()), 1)
    Path(OUT).mkdir(parents=True, exist_ok=True)
    Path(OUT, "probe_s9_32k.json").write_text(json.dumps(R, indent=1))
    print(f"\nburst {R['burst_tflops']} / sustained {R['sustained_tflops']} TFLOP/s; floor(32000) {R['floor_ms']} ms")
    for k in ("ttft_grain_default", "ttft_grain_256", "ttft_grain_256_31_layers"):
        print(f"{k:28s} {R[k]} ms = {min(R[k]) / floor:.3f}x")
    print("kernels", R["profile_total_ms"], "ms", kinds)
    for n, ms, c in R["profile_top"]:
        print(f"  {ms:9.2f} ms {c:5d}x {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
