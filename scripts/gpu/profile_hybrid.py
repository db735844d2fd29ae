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
import time

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
    mlp = worker.model.mlp
    assert isinstance(mlp, SplitMlp)
    host: HostCompute = mlp.host
    calls: list[tuple[float, float]] = []
    orig_call = SplitMlp.__call__

    def call(self, layer, h, w):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = orig_call(self, layer, h, w)
        calls.append((t0, time.perf_counter()))
        return out

    prompts = common.random_prompts(1, 128, worker.model_config.vocab_size)
    d = common.StepDriver(worker, prompts, max_new_tokens=steps + 4)
    d.prefill()
    d.decode()
    host.trace = []
    SplitMlp.__call__ = call  # type: ignore[method-assign]
    try:
        step_s = [d.decode() for _ in range(steps)]
    finally:
        SplitMlp.__call__ = orig_call  # type: ignore[method-assign]
        trace, host.trace = host.trace, None
    # Per split layer (resident layers also pass through __call__: keep those with a host job).
    n = len(trace)
    per_layer = []
    split_calls = [c for c in calls if c[1] - c[0] > 5e-4][-n:]  # split layers wait for the host
    for i in range(n - 1):
        sub, start, ready, done = trace[i]
        call_end = split_calls[i][1] if i < len(split_calls) else done
        per_layer.append({
            "pool_wake_us": (start - sub) * 1e6, "wait_input_us": (ready - start) * 1e6,
            "host_ms": (done - ready) * 1e3, "result_wake_us": (call_end - done) * 1e6,
            "to_next_submit_us": (trace[i + 1][0] - call_end) * 1e6, "layer_ms": (trace[i + 1][0] - sub) * 1e3,
        })  # fmt: skip
    keys = per_layer[0].keys() if per_layer else []
    med = {k: round(statistics.median(p[k] for p in per_layer), 3) for k in keys}
    return {"step_ms": [round(s * 1e3, 2) for s in step_s], "layers": len(per_layer) // max(1, steps), "median": med}


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
                    w.model.mlp.host = HostCompute(256, w.model_config.hidden_size, w.dtype, w.device, thr)
                name = f"ring{prefetch}_threads{thr}"
                s = common.summarize(common.time_steps(w, 1, 128, 6, 2), 1e3)
                t = trace_steps(w)
                rows.append({"variant": name, "step_p50_ms": s["p50"], **t["median"], "k": w.hybrid.chooser(1)})
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
