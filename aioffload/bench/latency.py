"""Decode step and request latency through Worker.execute, against the HBM floor (and HF eager).

For each batch size: `--num-iters` batched requests of `--input-len` prompt tokens that
produce `--output-len` tokens each (the prefill, chunked to the token budget, gives the
first; then output-len - 1 decode steps), timed per step. The HBM floor of a step is the
bytes it must read from device memory (every weight once, plus the batch's KV) over the
measured device-to-device copy bandwidth; with layers offloaded the floor is the larger of
that and the copy floor (offloaded bytes / host-to-device bandwidth).
"""

from __future__ import annotations

import argparse
import time

import torch

from aioffload.bench import common, hf
from aioffload.bench.common import phase, say
from aioffload.config import EngineConfig
from aioffload.worker.worker import Worker, pick_device

NAME = "latency"
TENSOR_PARALLEL = True  # one worker at a time: every rank builds its shard of it


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--batch-sizes", type=common.int_list, default=None,
                   help="several batch sizes in one run, e.g. 1,8,64 (overrides --batch-size)")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default: %(default)s)")
    p.add_argument("--num-iters", type=int, default=3, help="timed requests per batch size (default: %(default)s)")
    p.add_argument("--num-iters-warmup", type=int, default=1, help="untimed requests first (default: %(default)s)")
    p.add_argument("--hf-baseline", action="store_true",
                   help="also time Hugging Face transformers eager (all weights on the device) on the same checkpoint")
    p.add_argument("--hf-new-tokens", type=int, default=9,
                   help="HF per-step time = (generate(n) - generate(1)) / (n - 1) (default n: %(default)s)")
    p.add_argument("--check-graphs", action="store_true",
                   help="greedy tokens with CUDA graphs must equal those of a second, --enforce-eager worker")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens per prompt for --check-graphs")
    common.add_synthetic_args(p)


def run(config: EngineConfig, args: argparse.Namespace) -> int:
    batches = args.batch_sizes or [args.batch_size]
    if min(batches) < 1 or args.input_len < 1 or args.output_len < 1 or args.num_iters < 1 or args.hf_new_tokens < 2:
        raise ValueError("--batch-size(s), --input-len, --output-len, --num-iters must be >= 1, --hf-new-tokens >= 2")
    config = common.resolve_model(config, args)
    # Graphs are captured up to max_num_seqs: cover every batch we time.
    config = common.with_scheduler(config, max_num_seqs=max(config.scheduler.max_num_seqs, *batches))
    result: dict = {"bench": NAME, "model": config.model, "input_len": args.input_len,
                    "output_len": args.output_len, "num_iters": args.num_iters, "runs": [], "errors": {}}  # fmt: skip
    t_start = time.perf_counter()
    d2d = common.measure_d2d(pick_device(config.device))  # before the KV cache takes the free memory
    worker = common.build_worker(config)
    dev = worker.device
    result.update(device=common.device_name(dev), torch=torch.__version__, dtype=str(worker.dtype),
                  graphs=worker.graphs is not None,
                  offloaded_layers=len(worker.placement.offloaded_layers))  # fmt: skip
    # A copy of N bytes moves 2N (read + write); d2d_GBps counts both. The floor assumes a
    # stream of reads alone runs at that same total rate: floor = bytes read / d2d rate.
    result["d2d_GBps"] = round(d2d / 1e9, 1)
    say(f"device-to-device copy: {d2d / 1e9:.1f} GB/s (read + write)")
    for b in batches:
        with phase(result, f"batch_{b}"):
            result["runs"].append(_time_batch(worker, b, args, d2d))
    first = None
    if args.check_graphs:
        with phase(result, "check_graphs"):
            check_prompts = common.random_prompts(4, args.input_len, worker.model_config.vocab_size, seed=1234)
            first = common.greedy_tokens(worker, check_prompts, args.check_tokens)
            result["check_graphs"] = {"graphs_first": worker.graphs is not None}
    del worker
    common.free_device_memory()
    if first is not None:
        with phase(result, "check_graphs_eager"):
            eager = common.build_worker(config.replace(enforce_eager=True))
            second = common.greedy_tokens(eager, check_prompts, args.check_tokens)
            del eager
            common.free_device_memory()
            mism = sum(a != b for x, y in zip(first, second) for a, b in zip(x, y))
            result["check_graphs"].update(identical=first == second, mismatched_tokens=mism,
                                          tokens=len(check_prompts) * args.check_tokens)  # fmt: skip
            if not result["check_graphs"]["graphs_first"]:
                result["check_graphs"]["note"] = "graphs were off in the first worker too (CPU, offload or eager)"
            say(f"check-graphs: graphs vs eager greedy tokens identical: {first == second} ({mism} differ)")
    if args.hf_baseline:
        with phase(result, "hf_baseline"):
            _hf_baseline(config, args, dev, result)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    common.write_json("latency.json", result)
    _table(result)
    return 0 if not result["errors"] else 1


def _time_batch(worker: Worker, batch: int, args: argparse.Namespace, d2d: float) -> dict:
    steps: list[float] = []
    prefills: list[float] = []
    requests: list[float] = []
    vocab = worker.model_config.vocab_size
    for it in range(args.num_iters_warmup + args.num_iters):
        prompts = common.random_prompts(batch, args.input_len, vocab, seed=it)
        d = common.StepDriver(worker, prompts, max_new_tokens=args.output_len)
        pre = d.prefill()
        dec = [d.decode() for _ in range(args.output_len - 1)]
        if it >= args.num_iters_warmup:
            prefills.append(pre)
            steps += dec
            requests.append(pre + sum(dec))
    mid_context = args.input_len + args.output_len // 2
    w_bytes, kv_bytes = common.hbm_bytes_per_step(worker, batch, mid_context)
    hbm_floor = (w_bytes + kv_bytes) / d2d
    # With layers offloaded, a step also cannot beat moving them over the host link.
    copy_floor = worker.offload_bytes_per_step / worker.h2d_bytes_per_s
    floor = max(hbm_floor, copy_floor)
    entry: dict = {"batch": batch, "floor_ms": round(floor * 1e3, 3), "hbm_floor_ms": round(hbm_floor * 1e3, 3),
                   "copy_floor_ms": round(copy_floor * 1e3, 3), "weight_bytes_read": w_bytes,
                   "kv_bytes_read": kv_bytes, "request_s": common.summarize(requests, 1.0, 4),
                   "prefill_ms": common.summarize(prefills, 1e3)}  # fmt: skip
    if steps:
        s = common.summarize(steps, 1e3)
        entry.update(step_ms=s, step_over_floor=round(s["p50"] / 1e3 / floor, 3),
                     tok_s=round(batch / (s["p50"] / 1e3), 1))  # fmt: skip
        say(f"batch {batch}: step avg {s['avg']:.3f} ms  p10 {s['p10']:.3f}  p50 {s['p50']:.3f}  p90 {s['p90']:.3f}  "
            f"p99 {s['p99']:.3f}; floor {floor * 1e3:.3f} ms ({entry['step_over_floor']:.2f}x); "
            f"request {entry['request_s']['avg']:.3f} s")  # fmt: skip
    else:
        say(f"batch {batch}: request {entry['request_s']['avg']:.3f} s (--output-len 1: no decode steps)")
    return entry


def _hf_baseline(config: EngineConfig, args: argparse.Namespace, dev: torch.device, result: dict) -> None:
    from aioffload.checkpoint.checkpoint import Checkpoint

    dtype = Checkpoint.open(config.model).resolve_dtype(config.dtype, dev)
    model = hf.load(config.model, dtype).to(dev)
    vocab = model.config.vocab_size
    with torch.no_grad():
        for entry in result["runs"]:
            s = hf.per_step(model, entry["batch"], args.input_len, vocab, dev, args.hf_new_tokens)
            entry["hf_step_ms"] = round(s * 1e3, 3)
            if "step_ms" in entry:
                entry["speedup_vs_hf"] = round(s * 1e3 / entry["step_ms"]["avg"], 3)  # both are means
            say(f"batch {entry['batch']}: HF eager {s * 1e3:.3f} ms/step; speedup {entry.get('speedup_vs_hf')}")
    del model
    common.free_device_memory()


def _table(result: dict) -> None:
    rows: list[list] = [["batch", "step p50 ms", "p99 ms", "floor ms", "x floor", "tok/s", "request s", "HF ms",
                         "vs HF"]]  # fmt: skip
    for r in result["runs"]:
        s = r.get("step_ms", {})
        rows.append([r["batch"], s.get("p50"), s.get("p99"), r["floor_ms"], r.get("step_over_floor"), r.get("tok_s"),
                     r["request_s"]["avg"], r.get("hf_step_ms"), r.get("speedup_vs_hf")])  # fmt: skip
    if "check_graphs" in result:
        rows.append(["graphs==eager", result["check_graphs"].get("identical")])
    common.print_table(rows)
