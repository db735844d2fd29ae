# ruff: noqa: E501
"""Timeline of a hybrid decode step on the GPU machine (issue 11): where each offloaded layer's time goes.

Builds the offload bench's configuration (synthetic Llama-3-8B, emulated 24 GB card, 8 of 32 layers
resident) with `--hybrid on`, times batch-1 decode steps, and records per offloaded layer, on the
host clock: the step thread submitting the host share, the host thread starting, the layer input
arriving (blocking event), the host share done, the step thread getting it, and the next submit.
Variants: staging ring slots and host threads. Prints a table last; writes $OUT/profile_hybrid.json
and a torch profiler trace of one step ($OUT/trace_<variant>.json).

    python3 scripts/gpu/profile_hybrid.py
"""

from __future__ import annotations

import json
import os
import statistics

from aioffload.bench import common
from aioffload.bench.offload import trigger_for
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
from aioffload.offload.split_mlp import HostCompute, SplitMlp

OUT = os.environ.get("OUT", "/tmp/out")
R: dict = {}


def worker_for(path: str, prefetch: int, threads: int):  # type: ignore[no-untyped-def]
    mcfg = Checkpoint.open(path).model_config
    trigger, _ = trigger_for(mcfg, 2, 24e9, prefetch, False, 6.0, 8)
    cfg = EngineConfig(
        model=path, cache=CacheConfig(), scheduler=SchedulerConfig(max_num_seqs=8),
        offload=OffloadConfig(trigger=trigger, prefetch=prefetch, gpu_memory_gb=24.0, hybrid="on", host_threads=threads),
    ).validate()  # fmt: skip
    return common.build_worker(cfg)


def trace_steps(worker, steps: int = 4) -> dict:  # type: ignore[no-untyped-def]
    """Host-clock timeline of `steps` batch-1 decode steps, per host share (offloaded layer):
    host_ms (computing), wait_input_us (host thread idle until the layer input is there),
    gpu_gap_us (host share done -> next layer's input ready: the add, the next layer's attention
    and the input copy on the GPU, plus the event wake-up), period_ms (input to next input)."""
    mlp = worker.model.mlp
    assert isinstance(mlp, SplitMlp)
    host: HostCompute = mlp.host
    prompts = common.random_prompts(1, 128, worker.model_config.vocab_size)
    d = common.StepDriver(worker, prompts, max_new_tokens=steps + 4)
    d.prefill()
    d.decode()
    host.trace = []
    try:
        step_s = [d.decode() for _ in range(steps)]
    finally:
        trace, host.trace = host.trace, None
    rows = []
    for (_, st, rd, dn), (_, _, rd2, _) in zip(trace, trace[1:]):
        if rd2 - dn > 0.02:  # the step boundary (resident layers, sampling, the next step's launch)
            continue
        rows.append({"host_ms": (dn - rd) * 1e3, "wait_input_us": (rd - st) * 1e6, "gpu_gap_us": (rd2 - dn) * 1e6,
                     "period_ms": (rd2 - rd) * 1e3})  # fmt: skip
    med = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]} if rows else {}
    return {"step_ms": [round(x * 1e3, 2) for x in step_s], "shares": len(trace), "median": med,
            "async": host.asynchronous}  # fmt: skip


def profile_one_step(worker, name: str) -> None:  # type: ignore[no-untyped-def]
    prompts = common.random_prompts(1, 64, worker.model_config.vocab_size)
    d = common.StepDriver(worker, prompts, max_new_tokens=6)
    d.prefill()
    d.decode()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        d.decode()
    prof.export_chrome_trace(f"{OUT}/trace_{name}.json")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    path = str(make_synthetic_checkpoint("/tmp/s/llama3-8b", "llama3-8b"))
    rows = []
    for prefetch, threads in ((2, 15), (3, 15)):
        w = worker_for(path, prefetch, threads)
        try:
            for thr in sorted({threads, 16}):
                if thr != w.hybrid.host.threads:  # same worker, another host pool
                    w.model.mlp.host.close()
                    w.model.mlp.host = HostCompute(256, w.model_config.hidden_size, w.dtype, w.device, thr, 24)
                name = f"ring{prefetch}_threads{thr}"
                s = common.summarize(common.time_steps(w, 1, 128, 6, 2), 1e3)
                t = trace_steps(w)
                rows.append({"variant": name, "step_p50_ms": s["p50"], **t["median"], "k": w.hybrid.chooser(1),
                             "factor_b1": round(w.hybrid.chooser.factor[1], 2)})
                R[name] = {"decode_b1": s, **t}
                print(json.dumps(rows[-1]), flush=True)
                if prefetch == 3 and thr == 16:
                    profile_one_step(w, name)
        finally:
            del w
            common.free_device_memory()
    with open(f"{OUT}/profile_hybrid.json", "w") as f:
        json.dump(R, f, indent=1)
    common.print_table([list(rows[0].keys())] + [list(r.values()) for r in rows])


if __name__ == "__main__":
    main()
