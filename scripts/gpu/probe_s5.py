# ruff: noqa: E501
"""Fourth-session probe (issue 14), on the GPU machine; prints a table last, writes $OUT/probe_s5.json.

G. The four weight matmuls of Llama-3-8B at M = 32768 rows: one call against row chunks of
   16384 / 8192 / 4096 / 2048 (is the M = 32k slowdown the tile choice or the clock?), with the SM
   clock and power sampled by nvidia-smi alongside.
R. The rope + cache kernel at 32768 tokens: its bandwidth.
C. cuDNN at 32k: our padded call (dense_prefill's layout, with the LSE) against plain SDPA causal.
D. The batch-1 decode step at a 1k context: wall time through Worker.execute against the graph's
   own GPU time (replays back to back) and the argmax; M = 1 matmuls with cuBLAS against cuBLASLt.

    python3 scripts/gpu/probe_s5.py --synthetic-dir /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from aioffload.bench.attention_kernels import time_cuda

OUT = os.environ.get("OUT", "/tmp/out")
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def part_g(dev: torch.device, R: dict) -> None:
    m = 32768
    res: dict = {}
    for name, (n, k) in SHAPES.items():
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        row: dict = {}
        for rows in (32768, 16384, 8192, 4096, 2048):

            def fn(rows: int = rows, x: torch.Tensor = x, w: torch.Tensor = w, y: torch.Tensor = y) -> None:
                for a in range(0, m, rows):
                    torch.mm(x[a : a + rows], w.t(), out=y[a : a + rows])

            s = time_cuda(fn, 5)
            row[rows] = {"ms": round(s * 1e3, 3), "tflops": round(2 * m * n * k / s / 1e12, 1)}
        res[name] = row
        print("G:", name, {r: v["tflops"] for r, v in row.items()}, flush=True)
        del x, w, y
        torch.cuda.empty_cache()
    # A sustained pass: 32 layers' four matmuls at one row-chunk size, as a 32k prefill runs them.
    xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in (4096, 14336)}
    ws = {name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
    ys = {name: torch.empty(m, n, device=dev, dtype=torch.bfloat16) for name, (n, _) in SHAPES.items()}
    flops = sum(2 * m * n * k for n, k in SHAPES.values()) * 32
    sus: dict = {}
    for rows in (32768, 8192, 4096, 2048):

        def layers(rows: int = rows, xs: dict = xs, ws: dict = ws, ys: dict = ys) -> None:
            for _ in range(32):
                for name, (_n, k) in SHAPES.items():
                    for a in range(0, m, rows):
                        torch.mm(xs[k][a : a + rows], ws[name].t(), out=ys[name][a : a + rows])

        s = time_cuda(layers, 2)
        sus[rows] = {"ms": round(s * 1e3, 1), "tflops": round(flops / s / 1e12, 1)}
        print("G: sustained 32 layers, rows", rows, sus[rows], flush=True)
    res["sustained_32_layers"] = sus
    R["gemm_32k"] = res
    del xs, ws, ys
    torch.cuda.empty_cache()


def part_r(dev: torch.device, R: dict) -> None:
    from aioffload.model import fused

    t, hq, hkv, d = 32768, 32, 8, 128
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(t, device=dev)
    rope = torch.randn(t, 2, d, device=dev, dtype=torch.bfloat16)
    cache = torch.zeros(t // 16 + 1, 16, hkv, d, device=dev, dtype=torch.bfloat16)
    vcache = torch.zeros_like(cache)
    slots = torch.randperm(t, device=dev)
    s = time_cuda(lambda: fused.rope_and_cache(qkv, pos, rope, slots, cache, vcache, hq, hkv, d), 5)
    nbytes = qkv.numel() * 2 + t * (hq + 2 * hkv) * d * 2
    R["rope_32k"] = {"ms": round(s * 1e3, 3), "GBps": round(nbytes / s / 1e9)}
    print("R: rope+cache at 32k", R["rope_32k"], flush=True)


def part_c(dev: torch.device, R: dict) -> None:
    from aioffload.attention import dense_prefill as dp

    L = 32768
    q = torch.randn(L, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(L, 8, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = 4 * 32 * 128 * L * (L + 1) / 2
    qp, kp, vp = dp.padded(q, L), dp.padded(k, L), dp.padded(v, L)
    res = {}
    s = time_cuda(lambda: dp.cudnn_lse_attention(qp, kp, vp, True, 128**-0.5), 5)
    res["ours_lse"] = {"ms": round(s * 1e3, 2), "tflops": round(flops / s / 1e12, 1)}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        s = time_cuda(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True), 5)
    res["sdpa_cudnn"] = {"ms": round(s * 1e3, 2), "tflops": round(flops / s / 1e12, 1)}
    # 32 layers back to back (sustained, as in a prefill)
    s = time_cuda(lambda: [dp.cudnn_lse_attention(qp, kp, vp, True, 128**-0.5) for _ in range(32)], 2)
    res["ours_lse_x32"] = {"ms": round(s * 1e3, 1), "tflops": round(32 * flops / s / 1e12, 1)}
    R["cudnn_32k"] = res
    print("C:", res, flush=True)


def part_d(dev: torch.device, args: argparse.Namespace, R: dict) -> None:
    from aioffload.bench import common
    from aioffload.bench.synthetic import make_synthetic_checkpoint
    from aioffload.config import EngineConfig, SchedulerConfig

    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / "llama3-8b", "llama3-8b")
    cfg = EngineConfig(
        model=str(path), device="cuda", scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=4096)
    ).validate()
    worker = common.build_worker(cfg)
    prompt = common.random_prompts(1, 1000, worker.model_config.vocab_size, seed=3)[0]
    d = common.StepDriver(worker, [prompt], max_new_tokens=80)
    d.prefill()
    for _ in range(5):
        d.decode()
    walls = sorted(d.decode() for _ in range(31))
    g = worker.graphs.graphs[1]
    g.replay()
    s = time_cuda(lambda: [g.replay() for _ in range(20)], 3) / 20
    logits = worker.graphs.outputs[1][:1]
    a = time_cuda(lambda: logits.argmax(dim=-1), 20)
    res = {"wall_ms": round(walls[15] * 1e3, 3), "graph_gpu_ms": round(s * 1e3, 3), "argmax_us": round(a * 1e6, 1)}
    print("D:", res, flush=True)
    # M = 1 matmuls: cuBLAS against cuBLASLt
    x = {k: torch.randn(1, k, device=dev, dtype=torch.bfloat16) for k in (4096, 14336)}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (n, k) in list(SHAPES.items()) + [("lm_head", (128256, 4096))]:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            t = time_cuda(lambda w=w, k=k: [F.linear(x[k], w) for _ in range(50)], 3) / 50
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                F.linear(x[k], w)
                torch.cuda.synchronize()
            names = sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
            res[f"{lib}_{name}_us"] = round(t * 1e6, 2)
            res[f"{lib}_{name}_TBps"] = round(n * k * 2 / t / 1e12, 2)
            res[f"{lib}_{name}_kernels"] = names
            del w
    torch.backends.cuda.preferred_blas_library("cublas")
    R["decode"] = res
    print("D:", {k: v for k, v in res.items() if not k.endswith("kernels")}, flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-dir", default="/tmp/s")
    args = p.parse_args()
    dev = torch.device("cuda")
    R: dict = {"torch": torch.__version__}
    Path(OUT).mkdir(parents=True, exist_ok=True)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu", "--format=csv",
                            "-lms", "250"], stdout=open(Path(OUT, "smi.csv"), "w"))  # fmt: skip
    t = time.perf_counter()
    for name, part in (("g", part_g), ("r", part_r), ("c", part_c)):
        try:
            part(dev, R)
        except Exception as e:
            R[f"{name}_error"] = repr(e)[:300]
        R[f"{name}_done_s"] = round(time.perf_counter() - t, 1)
    try:
        part_d(dev, args, R)
    except Exception as e:
        R["d_error"] = repr(e)[:300]
    smi.terminate()
    R["total_s"] = round(time.perf_counter() - t, 1)
    Path(OUT, "probe_s5.json").write_text(json.dumps(R, indent=1))
    print(json.dumps({k: v for k, v in R.items() if k != "decode"}, indent=None))
    print(json.dumps({k: v for k, v in R.get("decode", {}).items() if not k.endswith("kernels")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
