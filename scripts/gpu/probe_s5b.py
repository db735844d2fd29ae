# ruff: noqa: E501
"""Fourth-session probe 2 (issue 14, the batch-1 decode step), on the GPU machine; prints a table
last, writes $OUT/probe_s5b.json.

M. The one-row GEMV (model/gemv.py) in a few launch configurations against cuBLAS, inside CUDA
   graphs (as the decode step runs them), over enough weight copies that L2 holds none of them.
D. A resident Llama-3-8B-shape worker at a 1k context: decode wall time and the graph's own GPU
   time with (a) neither change, (b) the rope in the decode launch, (c) (b) + the GEMV in the
   best configuration of M; greedy tokens of each against (a).
R. The rope + cache kernel at 32768 tokens (16 tokens a program now).

    python3 scripts/gpu/probe_s5b.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from probe_s5 import part_r  # this folder: the same 32k rope timing as call 1

from aioffload.bench.attention_kernels import time_cuda

OUT = os.environ.get("OUT", "/tmp/out")
SHAPES = {"qkv": (6144, 4096, 32), "o": (4096, 4096, 32), "gate_up": (28672, 4096, 32), "down": (4096, 14336, 32), "lm_head": (128256, 4096, 1)}
CONFIGS = [(16, 512, 4, 3), (8, 512, 4, 3), (16, 256, 4, 4), (32, 256, 4, 3), (16, 1024, 8, 3), (8, 1024, 4, 2), (4, 1024, 4, 3), (32, 128, 4, 4)]


def graph_time(fn, calls: int) -> float:
    """Seconds per call of fn(i), i = 0..calls-1, captured in one CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return time_cuda(g.replay, 5) / calls


def part_m(dev: torch.device, R: dict) -> tuple[int, int, int, int]:
    from aioffload.model import gemv

    res: dict = {}
    totals = {c: 0.0 for c in CONFIGS}
    cublas_total = 0.0
    for name, (n, k, per_step) in SHAPES.items():
        copies = max(2, -(-300_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        row = {"cublas_us": round(graph_time(lambda i, x=x, ws=ws, copies=copies: F.linear(x, ws[i % copies]), 2 * copies) * 1e6, 2)}
        cublas_total += row["cublas_us"] * per_step
        for c in CONFIGS:
            try:
                us = graph_time(lambda i, c=c, x=x, ws=ws, copies=copies: gemv.gemv(x, ws[i % copies], None, c), 2 * copies) * 1e6
                row[str(c)] = round(us, 2)
                totals[c] += us * per_step
            except Exception as e:
                row[str(c)] = repr(e)[:80]
                totals[c] += 1e9
        row["TBps_cublas"] = round(n * k * 2 / row["cublas_us"] / 1e6, 2)
        res[name] = row
        print("M:", name, row, flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    best = min(CONFIGS, key=lambda c: totals[c])
    res["per_step_us"] = {"cublas": round(cublas_total, 1), **{str(c): round(v, 1) for c, v in totals.items()}}
    res["best"] = list(best)
    R["gemv"] = res
    print("M: per step", res["per_step_us"], "best", best, flush=True)
    return best


def part_d(dev: torch.device, args: argparse.Namespace, R: dict, best: tuple[int, int, int, int]) -> None:
    from aioffload.bench import common
    from aioffload.bench.synthetic import make_synthetic_checkpoint
    from aioffload.config import EngineConfig, SchedulerConfig
    from aioffload.model import gemv
    from aioffload.worker.cuda_graphs import CudaGraphRunner

    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    cfg = EngineConfig(model=str(path), device="cuda", scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=4096)).validate()
    worker = common.build_worker(cfg)
    prompt = common.random_prompts(1, 1000, worker.model_config.vocab_size, seed=3)[0]
    max_blocks = worker.graphs.host.max_blocks
    out: dict = {}
    tokens: dict = {}
    for label, fuse, rows, config in (("a_neither", False, 0, None), ("b_rope", True, 0, None), ("c_rope_gemv", True, 1, best)):
        worker.attention.fuse_rope = fuse
        gemv.MAX_ROWS = rows
        if config:
            gemv.BLOCK_N, gemv.BLOCK_K, gemv.WARPS, gemv.STAGES = config
        worker.graphs = CudaGraphRunner(worker.model, worker.kv, 4, max_blocks)
        d = common.StepDriver(worker, [prompt], max_new_tokens=80)
        d.prefill()
        for _ in range(5):
            d.decode()
        walls = sorted(d.decode() for _ in range(41))
        g = worker.graphs.graphs[1]
        gpu = time_cuda(lambda g=g: [g.replay() for _ in range(20)], 3) / 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kern_us = sum(e.device_time_total for e in ev)
        out[label] = {"wall_ms": round(walls[20] * 1e3, 3), "wall_p10_ms": round(walls[4] * 1e3, 3), "graph_gpu_ms": round(gpu * 1e3, 3),
                      "kernels": len(ev), "kernel_sum_ms": round(kern_us / 1e3, 3)}  # fmt: skip
        tokens[label] = common.greedy_tokens(worker, [prompt[:200], prompt[200:500]], 24)
        print("D:", label, out[label], flush=True)
    out["tokens_equal_b"] = tokens["b_rope"] == tokens["a_neither"]
    out["tokens_equal_c"] = tokens["c_rope_gemv"] == tokens["a_neither"]
    logits = torch.randn(1, 128256, device=dev)
    from aioffload.worker.argmax import argmax_rows

    out["argmax_torch_us"] = round(time_cuda(lambda: logits.argmax(dim=-1), 20) * 1e6, 1)
    out["argmax_ours_us"] = round(time_cuda(lambda: argmax_rows(logits), 20) * 1e6, 1)
    R["decode"] = out
    print("D:", {k: v for k, v in out.items() if not isinstance(v, dict)}, flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    args = p.parse_args()
    dev = torch.device("cuda")
    R: dict = {"torch": torch.__version__}
    Path(OUT).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    best = tuple(CONFIGS[0])
    try:
        best = part_m(dev, R)
    except Exception as e:
        R["m_error"] = repr(e)[:300]
    for name, part in (("r", lambda: part_r(dev, R)), ("d", lambda: part_d(dev, args, R, best))):
        try:
            part()
        except Exception as e:
            R[f"{name}_error"] = repr(e)[:300]
    R["total_s"] = round(time.perf_counter() - t, 1)
    Path(OUT, "probe_s5b.json").write_text(json.dumps(R, indent=1))
    print(json.dumps(R.get("gemv", {}).get("per_step_us")), R.get("gemv", {}).get("best"))
    print(json.dumps(R.get("decode")))
    print(json.dumps(R.get("rope_32k")), {k: v for k, v in R.items() if k.endswith("error")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
