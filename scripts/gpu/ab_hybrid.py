# ruff: noqa: E501
"""Sixth-session A/B (issue 11): one fresh hybrid worker per process, timed as `bench offload` times it.

Run it once per version on the same machine, e.g. the current tree and an older `aioffload`
package first on PYTHONPATH. In a fresh process (as a server is) it builds the bench's worker
(synthetic Llama-3-8B, emulated 24 GB card, 8 of 32 layers resident, ring 3, --hybrid auto,
max_num_seqs 256), times decode at batch 1, 8, 64, 256 (6 steps after 4 warm-up, context 128),
and with --second builds a second worker in the same process after dropping the first, as the
bench does after its --hybrid off worker, and times batch 1 again. Prints one JSON line per row.

    python3 scripts/gpu/ab_hybrid.py LABEL [--second]
"""

from __future__ import annotations

import json
import os
import sys

from aioffload.bench import common
from aioffload.bench.offload import trigger_for
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig


def main() -> None:
    label, second = sys.argv[1], "--second" in sys.argv
    import aioffload

    path = str(make_synthetic_checkpoint("/tmp/s/llama3-8b", "llama3-8b"))
    mcfg = Checkpoint.open(path).model_config
    trigger, _ = trigger_for(mcfg, 2, 24e9, 3, False, 6.0, 8)
    cfg = EngineConfig(model=path, cache=CacheConfig(), scheduler=SchedulerConfig(max_num_seqs=256),
                       offload=OffloadConfig(trigger=trigger, prefetch=3, gpu_memory_gb=24.0, hybrid="auto")).validate()
    import torch

    bw = common.measure_h2d(torch.device("cuda"), 436 << 20)

    def machine() -> dict[str, float]:
        """Background the host is under: dirty/writeback page cache (MB) and the 1-minute load."""
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in open("/proc/meminfo")}
        return {"dirty_mb": info["Dirty"] // 1024, "writeback_mb": info["Writeback"] // 1024,
                "load1": float(open("/proc/loadavg").read().split()[0])}

    def measure(tag: str, batches: tuple[int, ...]) -> None:
        before = machine()
        w = common.build_worker(cfg)
        floor = w.offload_bytes_per_step / bw
        hp = w.hybrid
        for b in batches:
            k0 = hp.chooser(b)
            s = common.summarize(common.time_steps(w, b, 128, 6, 4), 1e3)
            print(json.dumps({"label": label, "run": tag, "package": os.path.dirname(aioffload.__file__), "batch": b,
                              "p50_ms": s["p50"], "floor_ms": round(floor * 1e3, 2), "ratio": round(s["p50"] / 1e3 / floor, 3),
                              "k_start": k0, "k_end": hp.chooser(b), "factor": round(hp.chooser.factor[b], 3),
                              "host_per_chunk_us_b1": round(hp.cost.host.per_chunk_s[0] * 1e6, 1), **before}), flush=True)
        del w, hp
        common.free_device_memory()

    measure("fresh", (1, 8, 64, 256))
    if second:
        measure("second worker", (1,))


if __name__ == "__main__":
    main()
