# ruff: noqa: E501
"""Sixth-session probe 3 (issue 11): why a real step's host shares run at 1.67x their calibrated time.

Probe 2 (call 3) showed the [H, K] down copies reading ~50 GB/s beside copies from a DRAM-sized
source. Here, on the real hybrid worker (synthetic Llama-3-8B, emulated 24 GB card, ring 3, 15 host
threads), per host share:
  A. a tight loop on the host pool's thread over the worker's own buffers (pinned gate|up rows and
     the down copies), old kernel (down^T rows) and new, at k = 45 and 63, batch 1;
  B. real batch-1 decode steps at a fixed k (45, 63): the step time and every share's host time
     (HostCompute.trace), as min / median / max per step, and the GB/s they imply.
Prints a table; JSON under $OUT.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from aioffload.bench import common  # noqa: E402
from aioffload.bench.offload import trigger_for  # noqa: E402
from aioffload.bench.synthetic import make_synthetic_checkpoint  # noqa: E402
from aioffload.checkpoint.checkpoint import Checkpoint  # noqa: E402
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig  # noqa: E402
from aioffload.offload.split_mlp import host_share, mlp_share  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
CHUNK_MB = 3 * 128 * 4096 * 2 / 1e6


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    path = str(make_synthetic_checkpoint("/tmp/s/llama3-8b", "llama3-8b"))
    mcfg = Checkpoint.open(path).model_config
    trigger, _ = trigger_for(mcfg, 2, 24e9, 3, False, 6.0, 8)
    cfg = EngineConfig(model=path, cache=CacheConfig(), scheduler=SchedulerConfig(max_num_seqs=8),
                       offload=OffloadConfig(trigger=trigger, prefetch=3, gpu_memory_gb=24.0, hybrid="on")).validate()
    w = common.build_worker(cfg)
    mlp, hp = w.model.mlp, w.hybrid
    host, sp = mlp.host, hp.split
    flats = w.layers.host
    layers = sorted(mlp.down)
    res: dict = {"threads": host.threads, "cap": host.max_chunks, "calibrated_k1": hp.chooser(1), "loop": [], "steps": []}
    print("calibrated k at batch 1:", hp.chooser(1), "cap", host.max_chunks, flush=True)

    def loop(kernel: str, k: int, reps: int = 48) -> float:
        x = torch.randn(1, mcfg.hidden_size).bfloat16()

        def job() -> float:
            ts = []
            for r in range(reps):
                flat = flats[layers[r % len(layers)]]
                gu = sp.gate_up_rows(flat, 0, k)
                t = time.perf_counter()
                if kernel == "new":
                    host_share(x, gu, mlp.down[layers[r % len(layers)]][:, : k * 128], 128, out=host.out_host[0][:1])
                else:
                    mlp_share(x, gu, sp.down_t_rows(flat, 0, k), 128, out=host.out_host[0][:1])
                ts.append(time.perf_counter() - t)
            return statistics.median(ts)

        return host.pool.submit(job).result()

    for kernel in ("old", "new"):
        for k in (45, 63):
            loop(kernel, k, 8)
            ms = loop(kernel, k) * 1e3
            res["loop"].append({"kernel": kernel, "k": k, "ms": ms, "GBps": k * CHUNK_MB / ms})
            print(res["loop"][-1], flush=True)

    for k in (45, 63):
        hp.before_step = lambda tokens, k=k: k  # type: ignore[method-assign]
        common.time_steps(w, 1, 128, 2, 1)
        host.trace = []
        s = common.summarize(common.time_steps(w, 1, 128, 6, 2), 1e3)
        trace, host.trace = host.trace, None
        host_ms = [(dn - rd) * 1e3 for _, _, rd, dn in trace]
        per_step = [host_ms[i : i + len(layers)] for i in range(0, len(host_ms), len(layers))]
        row = {"k": k, "step_p50_ms": s["p50"], "shares": len(host_ms),
               "host_ms_median": statistics.median(host_ms), "host_ms_min": min(host_ms), "host_ms_max": max(host_ms),
               "GBps_median": k * CHUNK_MB / statistics.median(host_ms),
               "first_of_step_ms": statistics.median(p[0] for p in per_step if p),
               "per_step_sum_ms": [round(sum(p), 1) for p in per_step]}
        res["steps"].append(row)
        print(json.dumps(row), flush=True)
    with open(f"{OUT}/probe_s7_step.json", "w") as f:
        json.dump(res, f, indent=1)
    print("loop (host pool thread, real buffers, batch 1):")
    for r in res["loop"]:
        print(f"  {r['kernel']:4} k={r['k']:3d}: {r['ms']:.2f} ms = {r['GBps']:.1f} GB/s")
    print("steps (batch 1, fixed k):")
    for r in res["steps"]:
        print(f"  k={r['k']:3d}: step {r['step_p50_ms']:.1f} ms; share median {r['host_ms_median']:.2f} ms "
              f"({r['GBps_median']:.1f} GB/s), min {r['host_ms_min']:.2f}, max {r['host_ms_max']:.2f}, "
              f"first of step {r['first_of_step_ms']:.2f}")


if __name__ == "__main__":
    main()
