# ruff: noqa: E501
"""Where a batch-1 resident decode step's time goes (issue 14, deliverable 4), on the GPU machine.

Synthetic Llama-3-8B, every weight resident, CUDA graphs on, a 1000-token context: times decode
steps through Worker.execute, then records `--steps` of them under the torch profiler and sums the
kernels by kind (weight matmuls, attention, norms/rope/activation, sampling, other), with each
kind's bytes where it reads weights, against the step's wall time and the HBM floor (bytes read /
measured device copy rate). Also a 16-sequence decode step eager and graphed, and a mixed step (16
decode tokens + a 512-token chunk) graph+eager against all eager. Prints a table last; writes
$OUT/profile_decode.json.

    python3 scripts/gpu/profile_decode.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from aioffload.bench import common
from aioffload.bench.prefill import long_context_view
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig
from aioffload.worker.inputs import SeqChunk, build_inputs

OUT = os.environ.get("OUT", "/tmp/out")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KINDS = [
    ("gemm", re.compile(r"gemm|gemv|cutlass|sm90_xmma|nvjet|splitK|ampere|Kernel2", re.I)),
    ("attention", re.compile(r"paged|attn|attention|decode_split|flash|_fwd", re.I)),
    ("fused_elementwise", re.compile(r"rms|norm|rope|silu|swiglu|act_and_mul|add_|fused", re.I)),
    ("sampling", re.compile(r"argmax|max|reduce|softmax|gumbel|sort|topk", re.I)),
]


def kind_of(name: str) -> str:
    for k, rx in KINDS:
        if rx.search(name):
            return k
    return "other"


def timed(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    common.sync(DEV)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        common.sync(DEV)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shape", default="llama3-8b", help="synthetic shape (tiny: a dry run on the CPU)")
    p.add_argument("--itl", action="store_true", help="also the ITL-under-prefill run, mixed steps each way")
    args = p.parse_args()
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / args.shape, args.shape)
    if args.shape != "tiny":
        path = long_context_view(str(path), 16384)  # the ITL run's 8k prompt plus the streams
    cfg = EngineConfig(model=str(path), device="cuda" if torch.cuda.is_available() else "cpu",
                       cache=CacheConfig(num_blocks=4096),
                       scheduler=SchedulerConfig(max_num_seqs=32, max_model_len=2048 if args.shape == "tiny" else 16384)).validate()  # fmt: skip
    worker = common.build_worker(cfg)
    assert worker.graphs is not None or not torch.cuda.is_available(), "graphs are off: the profile is of the graphed step"
    dev = worker.device
    copy_bps = common.measure_d2d(dev)
    weights, kv = common.hbm_bytes_per_step(worker, 1, args.context)
    R: dict = {"device": common.device_name(dev), "context": args.context, "copy_GBps": round(copy_bps / 1e9, 1),
               "hbm_floor_ms": round((weights + kv) / copy_bps * 1e3, 3), "weight_bytes": weights}  # fmt: skip

    vocab = worker.model_config.vocab_size
    d = common.StepDriver(worker, common.random_prompts(1, args.context, vocab, seed=1), args.steps * 3 + 40)
    d.prefill()
    for _ in range(5):
        d.decode()
    R["step_ms_b1"] = statistics.median(d.decode() for _ in range(args.steps)) * 1e3

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = []
        for _ in range(args.steps):
            wall.append(d.decode())
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time > 0:
            kernels.setdefault(e.name, []).append(e.device_time)  # us
    rows = sorted(((sum(v) / args.steps, len(v) / args.steps, n) for n, v in kernels.items()), reverse=True)
    by_kind: dict[str, float] = {}
    for us, _, n in rows:
        by_kind[kind_of(n)] = by_kind.get(kind_of(n), 0.0) + us
    R["profiled_wall_ms"] = statistics.median(wall) * 1e3
    R["kernel_us_per_step"] = sum(us for us, _, _ in rows)
    R["by_kind_us"] = {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    R["top_kernels"] = [{"us_per_step": round(us, 1), "calls_per_step": c, "name": n[:120], "kind": kind_of(n)} for us, c, n in rows[:25]]
    R["kernels_per_step"] = sum(c for _, c, _ in rows)
    prof.export_chrome_trace(f"{OUT}/trace_decode_b1.json")

    # 16 sequences: graphed vs eager decode, and a mixed step graph+eager vs all eager.
    d16 = common.StepDriver(worker, common.random_prompts(17, 64, vocab, seed=2), 64)
    d16.prefill()
    for i in range(16):
        d16.bm.allocate_slots(i, 65)
    d16.bm.allocate_slots(16, 520)
    bt = [d16.bm.block_table(i) for i in range(17)]
    dec = [SeqChunk([1], 64, bt[i]) for i in range(16)]
    chunk = SeqChunk([(7 * j) % (vocab - 3) + 3 for j in range(512)], 0, bt[16])

    def eager(chunks):  # type: ignore[no-untyped-def]
        inp = build_inputs(chunks, worker.block_size, dev)
        return worker.model.forward(inp.input_ids, inp.positions, inp.meta, worker.kv)

    start = min(4096, worker.max_model_len - 300)
    for n in (64, 256):  # smaller chunks, deep in a prompt: both ways of running the mixed step
        d16.bm.allocate_slots(16, start + n)
        late = SeqChunk([(5 * j) % (vocab - 3) + 3 for j in range(n)], start, d16.bm.block_table(16))
        for via in (True, False):
            worker.mixed_via_graph = via
            step = [*dec, late]
            R[f"mixed_{n}_at_4096_{'graph_eager' if via else 'all_eager'}_ms"] = timed(lambda s=step: worker._forward(s), 10) * 1e3
    worker.mixed_via_graph = False
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof2:
        for _ in range(5):
            eager([*dec, late])
        common.sync(DEV)
    R["mixed_eager_cpu_ops"] = prof2.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    prof2.export_chrome_trace(f"{OUT}/trace_mixed_eager.json")
    R["b16_graph_ms"] = timed(lambda: worker._forward(dec), 10) * 1e3
    R["b16_eager_ms"] = timed(lambda: eager(dec), 10) * 1e3
    R["mixed_graph_eager_ms"] = timed(lambda: worker._forward([*dec, chunk]), 10) * 1e3
    R["mixed_all_eager_ms"] = timed(lambda: eager([*dec, chunk]), 10) * 1e3
    R["chunk512_eager_ms"] = timed(lambda: eager([chunk]), 10) * 1e3
    if args.itl:  # 16 streams' ITL while an 8k prompt prefills, the mixed steps run each way
        import asyncio

        from aioffload.bench.itl_under_prefill import itl_under_prefill

        for via in (True, False):
            worker.mixed_via_graph = via
            i = asyncio.run(itl_under_prefill(worker, 16, min(8000, worker.max_model_len - 600), 24))
            R[f"itl_{'graph_eager' if via else 'all_eager'}"] = i
            print(f"ITL mixed via graph={via}: alone p99 {i['alone_ms']['p99']} ms, during p50 {i['during_ms']['p50']} "
                  f"p90 {i['during_ms']['p90']} p99 {i['during_ms']['p99']} ms ({i['p99_ratio']}x), TTFT {i['ttft_ms']} ms")
    Path(OUT, "profile_decode.json").write_text(json.dumps(R, indent=1))
    print(R["mixed_eager_cpu_ops"])
    print(f"{'kernel (per step)':90s} {'us':>8s} {'calls':>6s}")
    for k in R["top_kernels"][:15]:
        print(f"{k['name'][:90]:90s} {k['us_per_step']:8.1f} {k['calls_per_step']:6.1f}")
    print("by kind (us/step):", R["by_kind_us"], "kernels/step", R["kernels_per_step"])
    for key in ("step_ms_b1", "profiled_wall_ms", "kernel_us_per_step", "b16_graph_ms", "b16_eager_ms",
                "mixed_graph_eager_ms", "mixed_all_eager_ms", "chunk512_eager_ms", "copy_GBps", "hbm_floor_ms",
                *[k for k in R if k.startswith("mixed_") and k.endswith("_at_4096_graph_eager_ms") or k.endswith("_at_4096_all_eager_ms")]):
        print(f"{key:24s} {R[key]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
