# ruff: noqa: E501
"""Sixth-session probe 4 (issue 11): the bench's batch-1 hybrid steps, share by share.

Call 5: batch-1 shares took 1.77x their calibrated time in `bench offload` (the chooser cut k from
65 to 46), where call 4's fixed-k steps on the same kind of worker ran at ~1.0-1.1x. Here the
bench's own configuration (max_num_seqs 256, --hybrid auto, ring 3), straight after start-up:
  run 1 and run 2: time_steps(1, 128, 6, 4) as the bench, with each step's k and every share's time;
  then 8 steps at a fixed k = the calibrated one; then batch 8 as the bench.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.getcwd())
from aioffload.bench import common  # noqa: E402
from aioffload.bench.offload import trigger_for  # noqa: E402
from aioffload.bench.synthetic import make_synthetic_checkpoint  # noqa: E402
from aioffload.checkpoint.checkpoint import Checkpoint  # noqa: E402
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    path = str(make_synthetic_checkpoint("/tmp/s/llama3-8b", "llama3-8b"))
    mcfg = Checkpoint.open(path).model_config
    trigger, _ = trigger_for(mcfg, 2, 24e9, 3, False, 6.0, 8)
    cfg = EngineConfig(model=path, cache=CacheConfig(), scheduler=SchedulerConfig(max_num_seqs=256),
                       offload=OffloadConfig(trigger=trigger, prefetch=3, gpu_memory_gb=24.0, hybrid="auto")).validate()
    w = common.build_worker(cfg)
    hp, host = w.hybrid, w.model.mlp.host
    k_cal = hp.chooser(1)
    ks: list[tuple[int, int]] = []
    orig = hp.before_step

    def logged(tokens: int) -> int:
        k = orig(tokens)
        ks.append((tokens, k))
        return k

    hp.before_step = logged  # type: ignore[method-assign]
    res: dict = {"k_calibrated_b1": k_cal, "runs": []}

    def run(name: str, batch: int = 1, n: int = 6, warmup: int = 4) -> None:
        ks.clear()
        host.trace = []
        steps = common.time_steps(w, batch, 128, n, warmup)
        trace, host.trace = host.trace, None
        obs = [(t1 - t0) * 1e3 for _, _, t0, t1 in trace]
        decode_ks = [k for tok, k in ks if tok == batch]
        per = 24
        r = {"name": name, "step_ms": [round(s * 1e3, 1) for s in steps], "k_per_step": decode_ks,
             "factor_b": round(hp.chooser.factor[batch], 3),
             "share_ms_median_per_step": [round(statistics.median(obs[i:i + per]), 2) for i in range(0, len(obs), per)],
             "share_ms_max_per_step": [round(max(obs[i:i + per]), 2) for i in range(0, len(obs), per)]}
        res["runs"].append(r)
        print(json.dumps(r), flush=True)

    run("b1 first (as the bench)")
    run("b1 second")
    hp.before_step = lambda tokens: (ks.append((tokens, k_cal)) or k_cal) if tokens == 1 else logged(tokens)  # type: ignore[method-assign]
    run(f"b1 fixed k={k_cal}", n=8)
    hp.before_step = logged  # type: ignore[method-assign]
    run("b8 (as the bench)", batch=8)
    with open(f"{OUT}/probe_s7_chooser.json", "w") as f:
        json.dump(res, f, indent=1)
    print("calibrated k at b1:", k_cal)
    for r in res["runs"]:
        print(f"{r['name']:24} steps {statistics.median(r['step_ms']):6.1f} ms  k {r['k_per_step']}  factor {r['factor_b']}")
        print(f"{'':24} share medians {r['share_ms_median_per_step']}")
        print(f"{'':24} share max     {r['share_ms_max_per_step']}")


if __name__ == "__main__":
    main()
