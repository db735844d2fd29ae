# ruff: noqa: E501
"""Where a resident 32k-token prefill's time goes, and which attention kernel is fastest at it
(issue 14, third session), on the GPU machine. Prints a table last; writes $OUT/probe_long.json.

A. Attention alone (Llama-3-8B heads): one fresh 32k causal prompt and the chunk cases chunked
   prefill runs (the last 2048 / 8192 queries after a cached prefix), our paged kernel in a few
   launch configurations against SDPA's flash / cuDNN / memory-efficient backends.
B. A resident synthetic 8B worker: 32k TTFT at token budgets 2048, 8192, 32768 (one chunk), and
   the 2048 run's kernels under the profiler, summed by kind.
C. The batch-1 decode step's kernels at a 1k context, by name (which small kernels to fuse).

    python3 scripts/gpu/probe_long.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from aioffload.bench import common
from aioffload.bench.attention_kernels import PagedCase, _ours, causal_flops, time_cuda
from aioffload.bench.prefill import compute_floor_s, long_context_view
from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.config import EngineConfig, SchedulerConfig
from aioffload.worker.step_cost import measure_dense_flops

OUT = os.environ.get("OUT", "/tmp/out")
KINDS = [
    ("gemm", re.compile(r"gemm|gemv|cutlass|sm90_xmma|nvjet|splitK|Kernel2", re.I)),
    ("prefill_attn", re.compile(r"_prefill_kernel", re.I)),
    ("decode_attn", re.compile(r"_paged_attn|_combine", re.I)),
    ("fused", re.compile(r"rms|rope|silu", re.I)),
]


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def kernel_sums(prof) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            by_kind[kind_of(e.name)] += us / 1e3
            by_name[e.name[:90]][0] += us / 1e3
            by_name[e.name[:90]][1] += 1
    return {k: round(v, 2) for k, v in by_kind.items()}, by_name


def sdpa_paths(case: PagedCase, R: list, label: str, flops: float, rect: bool) -> None:
    """SDPA backends over contiguous [1, H, L, D]; rect: the chunk's queries against its prefix, no mask."""
    q = case.rows.transpose(0, 1)[None] if rect else case.q.transpose(0, 1)[None]
    n_keys = case.length - case.queries if rect else case.length
    k = case.k[:n_keys].transpose(0, 1)[None]
    v = case.v[:n_keys].transpose(0, 1)[None]
    kx, vx = (x.repeat_interleave(4, dim=1) for x in (k, v))
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
        for gqa in (True, False):
            try:
                with sdpa_kernel(be):
                    fn = (
                        (
                            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                                q, k, v, is_causal=not rect, enable_gqa=True
                            )
                        )
                        if gqa
                        else (lambda q=q, k=kx, v=vx: F.scaled_dot_product_attention(q, k, v, is_causal=not rect))
                    )
                    s = time_cuda(fn, 3)
                R.append(
                    {
                        "case": label,
                        "path": f"sdpa {name}{' gqa' if gqa else ' expanded'}",
                        "ms": round(s * 1e3, 2),
                        "tflops": round(flops / s / 1e12, 1),
                    }
                )
            except Exception as e:  # a backend that does not take this case
                R.append(
                    {
                        "case": label,
                        "path": f"sdpa {name}{' gqa' if gqa else ' expanded'}",
                        "error": str(e).splitlines()[0][:120],
                    }
                )


def part_a(dev: torch.device, R: dict) -> None:
    rows: list = []
    R["kernels"] = rows
    configs = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
    for length, queries in ((32768, 32768), (32768, 2048), (32768, 8192)):
        case = PagedCase(length, queries, dev, seed=1)
        label = f"{queries} q after {length - queries}"
        flops = causal_flops(queries, length)
        for cfg in configs:
            try:
                s = time_cuda(_ours(case, *cfg), 3)
                rows.append(
                    {
                        "case": label,
                        "path": f"ours m{cfg[0]} n{cfg[1]} w{cfg[2]} s{cfg[3]}",
                        "ms": round(s * 1e3, 2),
                        "tflops": round(flops / s / 1e12, 1),
                    }
                )
            except Exception as e:
                rows.append({"case": label, "path": f"ours {cfg}", "error": str(e).splitlines()[0][:120]})
        if queries == length:
            sdpa_paths(case, rows, label, flops, rect=False)
        else:
            sdpa_paths(
                case, rows, label + " (prefix part, no mask)", 4 * 32 * 128 * queries * (length - queries), rect=True
            )
        del case
        torch.cuda.empty_cache()
        print(
            "A:",
            label,
            [(r["path"], r.get("tflops", r.get("error"))) for r in rows if r["case"].startswith(label)],
            flush=True,
        )


def part_b_c(dev: torch.device, args: argparse.Namespace, R: dict) -> None:
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    path = long_context_view(str(path), 33000)
    cfg = EngineConfig(model=str(path), device="cuda",
                       scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=33000, max_num_batched_tokens=32768)).validate()  # fmt: skip
    worker = common.build_worker(cfg)
    mcfg = worker.model_config
    flops = measure_dense_flops(dev, torch.bfloat16, mcfg.hidden_size, mcfg.intermediate_size)
    R["dense_tflops"] = round(flops / 1e12, 1)
    floor = compute_floor_s(mcfg, 32000, flops)
    R["floor_32k_ms"] = round(floor * 1e3, 1)
    vocab = mcfg.vocab_size
    prompt = common.random_prompts(1, 32000, vocab, seed=3)[0]
    ttft = {}
    for budget in (2048, 8192, 32768):
        worker.token_budget = budget  # and the cuDNN shapes of that budget, as a worker built with it warms them
        t = time.perf_counter()
        worker.attention.warm_dense(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, torch.bfloat16, dev, budget,
                                    worker.max_model_len)  # fmt: skip
        warm_s = time.perf_counter() - t
        common.StepDriver(worker, [prompt[:4096]], max_new_tokens=1).prefill()  # warm-up
        runs = [common.StepDriver(worker, [prompt], max_new_tokens=1).prefill() for _ in range(2)]
        s = min(runs)
        ttft[budget] = {"ms": round(s * 1e3, 1), "first_ms": round(runs[0] * 1e3, 1), "x_floor": round(s / floor, 3),
                        "warm_s": round(warm_s, 2)}  # fmt: skip
        print(f"B: 32k TTFT at budget {budget}: {s * 1e3:.1f} ms = {s / floor:.3f}x the floor (first run "
              f"{runs[0] * 1e3:.1f} ms; plans warmed in {warm_s:.2f} s)", flush=True)
    R["ttft_32k"] = ttft
    for budget in (2048, 32768):
        worker.token_budget = budget
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            common.StepDriver(worker, [prompt], max_new_tokens=1).prefill()
            torch.cuda.synchronize()
        kinds, names = kernel_sums(prof)
        top = sorted(names.items(), key=lambda kv: -kv[1][0])[:12]
        R[f"profile_32k_budget_{budget}"] = {"kinds_ms": kinds, "top": [(n, round(v[0], 1), v[1]) for n, v in top]}
        print(f"B: profile at budget {budget}: {kinds}", flush=True)
    # C: decode step at 1k context, graphs on
    worker.token_budget = 2048
    d = common.StepDriver(worker, [prompt[:1000]], max_new_tokens=40)
    d.prefill()
    for _ in range(5):
        d.decode()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            d.decode()
        torch.cuda.synchronize()
    walls = [d.decode() for _ in range(10)]
    kinds, names = kernel_sums(prof)
    R["decode_1k"] = {"wall_ms_median": round(sorted(walls)[5] * 1e3, 3), "kinds_ms_per_step": {k: round(v / 10, 3) for k, v in kinds.items()},
                      "kernels": sorted([(n, round(v[0] / 10 * 1e3, 1), v[1] // 10) for n, v in names.items()], key=lambda x: -x[1])}  # fmt: skip
    print("C: decode step", R["decode_1k"]["wall_ms_median"], "ms;", R["decode_1k"]["kinds_ms_per_step"], flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    args = p.parse_args()
    dev = torch.device("cuda")
    R: dict = {"torch": torch.__version__, "device": common.device_name(dev)}
    t = time.perf_counter()
    try:
        part_a(dev, R)
    except Exception as e:
        R["a_error"] = repr(e)[:300]
    try:
        part_b_c(dev, args, R)
    except Exception as e:
        R["bc_error"] = repr(e)[:300]
    R["total_s"] = round(time.perf_counter() - t, 1)
    Path(OUT).mkdir(parents=True, exist_ok=True)
    Path(OUT, "probe_long.json").write_text(json.dumps(R, indent=1))
    print("\n== kernels (TFLOP/s) ==")
    for r in R.get("kernels", []):
        print(f"{r['case']:38s} {r['path']:28s} {r.get('ms', '')!s:>9} {r.get('tflops', r.get('error', ''))}")
    print("dense", R.get("dense_tflops"), "floor32k", R.get("floor_32k_ms"), "ttft", R.get("ttft_32k"))
    for k in ("profile_32k_budget_2048", "profile_32k_budget_32768"):
        if k in R:
            print(k, R[k]["kinds_ms"])
            for n, ms, c in R[k]["top"][:6]:
                print(f"   {ms:9.1f} ms {c:6d}x {n}")
    if "decode_1k" in R:
        print("decode", R["decode_1k"]["wall_ms_median"], R["decode_1k"]["kinds_ms_per_step"])
        for n, us, c in R["decode_1k"]["kernels"][:20]:
            print(f"   {us:8.1f} us/step {c:4d}x {n}")
    print({k: v for k, v in R.items() if k.endswith("error")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
