"""Offload on a small card (issue 4): decode steps against the copy floor, engine throughput,
greedy equality with the all-resident model, no cost when everything fits, and HF Accelerate.

One run on one GPU. A Llama-3-8B-shaped synthetic checkpoint (16 GB bf16) on an emulated
24 GB card (--gpu-memory-gb) with a trigger that keeps --resident-gb of weights on the
GPU (embedding, lm_head and norm count first) and streams the rest. Phases run in the
order that fits memory: the offloaded workers (with the host computing a share of each
offloaded layer, then streaming only; `--hybrid-order last` swaps them), then all-resident
workers, then Accelerate (model in host RAM). A failed phase is recorded in the JSON and the others go on.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time

import torch

from aioffload.bench import common, hf, hybrid
from aioffload.bench.common import phase, say
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import ConfigError, EngineConfig, ModelConfig
from aioffload.model.layout import layer_layout
from aioffload.worker.worker import Worker, pick_device

NAME = "offload"
ENGINE_TARGET_EFFICIENCY = 0.7  # engine output tok/s target: 0.7 x concurrency / copy floor
CPU_MAX_MODEL_BYTES = 1e9  # without a GPU only small models make sense (the CPU checks the code path)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resident-gb", type=float, default=6.0,
                   help="GB of weights the derived trigger keeps on the GPU, embedding/lm_head/norm included "
                        "(default: %(default)s; ignored when --trigger or --cpu-offload-gb is given)")
    p.add_argument("--resident-layers", type=int, default=None,
                   help="derive the trigger for exactly this many resident decoder layers instead of --resident-gb")
    p.add_argument("--batch-sizes", type=common.int_list, default=[1, 8, 64, 256],
                   help="decode batch sizes timed against the copy floor (default: 1,8,64,256)")
    p.add_argument("--context-len", type=int, default=128, help="context of the timed decode steps (default: 128)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per batch size (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=256, help="concurrent engine requests (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128, help="engine prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="engine output tokens, EOS ignored (default: 128)")
    p.add_argument("--check-prompts", type=int, default=4, help="prompts of the greedy offload-vs-resident check")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens per check prompt (default: 16)")
    p.add_argument("--resident-steps", type=int, default=32,
                   help="timed batch-1 steps of the trigger-fits vs trigger-1.0 comparison (default: 32)")
    p.add_argument("--skip-accelerate", action="store_true", help="skip the HF Accelerate baseline")
    p.add_argument("--skip-engine", action="store_true", help="skip the concurrent-requests engine run")
    p.add_argument("--skip-resident", action="store_true", help="skip the all-resident (trigger fits vs 1.0) phases")
    p.add_argument("--accelerate-gpu-budget", default="6GiB", help="Accelerate max_memory for the GPU (6GiB)")
    p.add_argument("--accelerate-cpu-budget", default="110GiB", help="Accelerate max_memory for the CPU (110GiB)")
    p.add_argument("--accelerate-batch-sizes", type=common.int_list, default=[1, 8], help="(default: 1,8)")
    p.add_argument("--hf-new-tokens", type=int, default=9, help="Accelerate per step = (gen(n) - gen(1)) / (n - 1)")
    p.add_argument("--router-skew", type=float, default=2.0,
                   help="MoE models: std of a fixed per-layer bias on router logits for the skewed run (0: skip)")
    p.add_argument("--emulate-layers", type=int, default=None,
                   help="MoE models: plan for the shape's full layer count (default: the synthetic shape's) and "
                        "scale the expert split to the layers written")
    p.add_argument("--hybrid-order", choices=("first", "last"), default="first",
                   help="build the --hybrid worker before the --hybrid off one (first: as a server, a fresh "
                        "process) or after it (default: %(default)s)")
    common.add_synthetic_args(p, default="llama3-8b")


def emulated_offload(base: EngineConfig, mcfg: ModelConfig, elem: int, resident_gb: float,
                     resident_layers: int | None) -> EngineConfig:  # fmt: skip
    """`base` on an emulated card (--gpu-memory-gb, default 24 GB). Unless --trigger or
    --cpu-offload-gb says otherwise, the trigger that keeps `resident_layers` layers (or what fits
    in `resident_gb`) resident, as trigger_for computes it."""
    gpu_gb = base.offload.gpu_memory_gb or 24.0
    cfg = common.with_offload(base, gpu_memory_gb=gpu_gb)
    if base.offload.trigger == 1.0 and base.offload.cpu_offload_gb is None:
        trigger, r = trigger_for(mcfg, elem, gpu_gb * 1e9, base.offload.prefetch, base.offload.embed_on_host,
                                 resident_gb, resident_layers)  # fmt: skip
        say(f"trigger {trigger:.4g} x {gpu_gb:g} GB keeps {r} of {mcfg.num_layers} layers resident")
        cfg = common.with_offload(cfg, trigger=trigger)
    return cfg.validate()


def trigger_for(mcfg: ModelConfig, elem: int, total: float, prefetch: int, embed_on_host: bool,
                resident_gb: float, resident_layers: int | None = None) -> tuple[float, int]:  # fmt: skip
    """(trigger, resident layers) so that placement keeps `resident_layers` layers, or as many as fit
    in `resident_gb` GB beside the non-layer weights (placement.py's arithmetic: weights in
    forward order plus the prefetch ring must stay <= trigger x total)."""
    lb = layer_layout(mcfg).numel * elem
    vocab = mcfg.vocab_size * mcfg.hidden_size * elem
    non_layer = (0 if embed_on_host else vocab) + (0 if mcfg.tie_word_embeddings and not embed_on_host else vocab)
    non_layer += mcfg.hidden_size * elem  # final norm
    L = mcfg.num_layers
    r = resident_layers if resident_layers is not None else math.floor((resident_gb * 1e9 - non_layer) / lb)
    r = max(0, r)
    if r >= L:
        raise ValueError(f"{r} resident layers of {L}: nothing would be offloaded; lower --resident-gb/-layers")

    def footprint(n: int) -> int:
        return non_layer + n * lb + min(prefetch, L - n) * lb

    if footprint(r + 1) <= footprint(r):
        raise ValueError(
            f"no trigger stops at {r} resident layers: one more resident layer frees a ring slot of the same size; "
            "choose another count or a smaller --offload-prefetch"
        )
    return (footprint(r) + footprint(r + 1)) / 2 / total, r


def refuse_without_gpu(config: EngineConfig, args: argparse.Namespace) -> None:
    """ConfigError before anything is written when there is no GPU and the model is large (the default
    llama3-8b synthetic checkpoint is 16 GB of random weights, minutes of CPU time to draw)."""
    if pick_device(config.device).type == "cuda":
        return
    shape = getattr(args, "synthetic", None)
    if shape and shape != "none":
        from aioffload.bench.synthetic import hf_config

        what = f"the {shape} synthetic checkpoint"
        size = _weight_bytes(ModelConfig.from_hf(hf_config(shape)), 2)  # bf16, as make_synthetic_checkpoint writes
    else:
        ckpt = Checkpoint.open(config.model)
        what, size = str(ckpt.path), sum(e.nbytes for e in ckpt.entries.values())
    if size > CPU_MAX_MODEL_BYTES:
        raise ConfigError(
            f"bench offload: no CUDA device here, and {what} holds {size / 1e9:.1f} GB of weights: run it on a GPU "
            "machine; on the CPU, --synthetic tiny --device cpu checks every code path in seconds"
        )


def run(config: EngineConfig, args: argparse.Namespace) -> int:
    refuse_without_gpu(config, args)
    t_start = time.perf_counter()
    R: dict = {"bench": NAME, "torch": torch.__version__, "errors": {}}
    with phase(R, "checkpoint"):
        config = common.resolve_model(config, args)
    if "checkpoint" in R["errors"]:
        common.write_json("offload.json", R)
        return 1
    ckpt = Checkpoint.open(config.model)
    if ckpt.model_config.is_moe:  # routed-expert streaming has its own phases (bench/moe_offload.py)
        from aioffload.bench import moe_offload

        return moe_offload.run(config, args)
    mcfg, dev = ckpt.model_config, pick_device(config.device)
    dtype = ckpt.resolve_dtype(config.dtype, dev)
    seqs = max(config.scheduler.max_num_seqs, *args.batch_sizes, args.num_prompts, args.check_prompts)
    base = common.with_scheduler(config, max_num_seqs=seqs)
    gpu_gb = config.offload.gpu_memory_gb or 24.0
    R.update(model=config.model, device=common.device_name(dev), dtype=str(dtype), emulated_gpu_gb=gpu_gb,
             max_num_seqs=seqs, model_gb=round(_weight_bytes(mcfg, dtype.itemsize) / 1e9, 2))  # fmt: skip
    # The streaming baseline is --hybrid off; the hybrid phase runs the --hybrid given (default auto),
    # by default first in the process (--hybrid-order; bench/hybrid.py says why).
    hybrid_mode = config.offload.hybrid
    off_cfg: EngineConfig | None = common.with_offload(base, gpu_memory_gb=gpu_gb, hybrid="off")
    if config.offload.trigger == 1.0 and config.offload.cpu_offload_gb is None:
        with phase(R, "derive_trigger"):
            trigger, r = trigger_for(mcfg, dtype.itemsize, gpu_gb * 1e9, config.offload.prefetch,
                                     config.offload.embed_on_host, args.resident_gb, args.resident_layers)  # fmt: skip
            R["derived"] = {"trigger": trigger, "resident_layers": r}
            say(f"derived trigger {trigger:.4g} x {gpu_gb:g} GB: {r} of {mcfg.num_layers} layers resident")
            off_cfg = common.with_offload(off_cfg, trigger=trigger).validate()
        if "derive_trigger" in R["errors"]:
            off_cfg = None
    prompts = common.random_prompts(args.check_prompts, 32, mcfg.vocab_size, seed=4321)
    greedy_off = None
    bw = None
    with phase(R, "h2d"):  # on an idle card, with copies the size of one layer (what the ring moves)
        bw = common.measure_h2d(dev, max(layer_layout(mcfg).numel * dtype.itemsize, 64 << 20))
    hyb_cfg = None if hybrid_mode == "off" or off_cfg is None else common.with_offload(off_cfg, hybrid=hybrid_mode)
    R["hybrid_order"] = args.hybrid_order if hyb_cfg is not None else None
    greedy_hybrid: common.Greedy | None = None

    def hybrid_worker(order: str) -> None:
        nonlocal greedy_hybrid
        if hyb_cfg is not None and args.hybrid_order == order:
            with phase(R, "hybrid_worker"):
                greedy_hybrid = hybrid.hybrid_phase(hyb_cfg, args, R, prompts, lambda w: _copy_floor(w, bw, R))

    hybrid_worker("first")
    worker: Worker | None = None
    with phase(R, "offload_worker"):
        if off_cfg is None:
            raise ValueError("no trigger (see derive_trigger)")
        common.reset_peak_rss()  # this worker's own peak, whichever worker came first
        worker = common.build_worker(off_cfg)
        p = worker.placement
        R["plan"] = {
            "trigger": p.trigger, "resident_layers": len(p.resident_layers),
            "offloaded_layers": len(p.offloaded_layers),
            "gpu_weight_gb": round(p.gpu_weight_bytes / 1e9, 3), "host_weight_gb": round(p.host_weight_bytes / 1e9, 3),
            "ring_gb": round(p.ring_bytes / 1e9, 3), "kv_blocks": worker.num_blocks,
            "offload_bytes_per_step": worker.offload_bytes_per_step, "reason": p.reason,
        }  # fmt: skip
        # Issue acceptance: process peak RSS (VmHWM, the kernel's high-water mark) after the load
        # stays under 1.1 x offloaded + 2 GB (DESIGN.md section 3).
        off_gb = p.host_weight_bytes / 1e9
        R["host_memory"] = {"peak_rss_gb": round(common.peak_rss_bytes() / 1e9, 3), "offloaded_gb": round(off_gb, 3),
                            "rss_limit_gb": round(1.1 * off_gb + 2, 3)}  # fmt: skip
        h = R["host_memory"]
        say(f"host RSS peak {h['peak_rss_gb']} GB for {h['offloaded_gb']} GB offloaded (limit {h['rss_limit_gb']} GB)")
    greedy_gaps = None
    if worker is not None:
        floor = _copy_floor(worker, bw, R)
        _decode_phase(worker, args, floor, R)
        if not args.skip_engine:
            with phase(R, "engine"):
                prompts_e = common.random_prompts(args.num_prompts, args.input_len, mcfg.vocab_size, seed=0)
                R["engine"] = asyncio.run(_engine_run(worker.config, worker, prompts_e, args.output_len))
                e = R["engine"]
                if floor:
                    e["target_tok_s"] = round(ENGINE_TARGET_EFFICIENCY * args.num_prompts / floor, 1)
                    e["ratio_to_target"] = round(e["output_tok_s"] / e["target_tok_s"], 3)
                say(f"engine: {e['output_tok_s']} output tok/s, {e['requests_per_s']} req/s in {e['elapsed_s']} s; "
                    f"target {e.get('target_tok_s')} ({e.get('ratio_to_target')}x)")  # fmt: skip
        with phase(R, "greedy_offload"):
            greedy_gaps = common.greedy_with_gaps(worker, prompts, args.check_tokens)
            greedy_off = greedy_gaps[0]
        del worker
        common.free_device_memory()
    hybrid_worker("last")
    hybrid.compare(R, args, greedy_gaps, greedy_hybrid)
    res_cfg = common.with_offload(base, gpu_memory_gb=None, trigger=1.0, cpu_offload_gb=None)
    fit_trigger = config.cache.gpu_memory_utilization  # the highest trigger validate() allows below 1.0
    fit_cfg = common.with_offload(res_cfg, trigger=fit_trigger).validate()
    R["fit_vs_trigger1"] = {"fit_trigger": fit_trigger}
    if not args.skip_resident:
        with phase(R, "resident_trigger_1"):
            _resident_phase(res_cfg, "trigger_1", prompts if greedy_off is not None else None, args, R, greedy_off)
        with phase(R, "resident_trigger_fit"):
            _resident_phase(fit_cfg, "trigger_fit", None, args, R, None)
    f = R["fit_vs_trigger1"]
    if "trigger_fit_step_ms" in f and "trigger_1_step_ms" in f:
        f["ratio"] = round(f["trigger_fit_step_ms"] / f["trigger_1_step_ms"], 3)
        say(f"trigger {fit_trigger:g} (all fit) vs 1.0 at batch 1: {f['ratio']}x")
    with phase(R, "accelerate"):
        _accelerate_phase(config.model, dtype, dev, args, R)
    R["total_s"] = round(time.perf_counter() - t_start, 1)
    common.write_json("offload.json", R)
    _table(R)
    return 0 if not R["errors"] else 1


def _weight_bytes(mcfg: ModelConfig, elem: int) -> int:
    vocab = mcfg.vocab_size * mcfg.hidden_size * elem
    return mcfg.num_layers * layer_layout(mcfg).numel * elem + vocab * (1 if mcfg.tie_word_embeddings else 2)


def _copy_floor(worker: Worker, measured_bw: float | None, R: dict) -> float | None:
    """The plan's copy floor in seconds: offloaded bytes per step / pinned H2D bandwidth."""
    R["h2d_measured"] = measured_bw is not None
    bw = measured_bw or worker.h2d_bytes_per_s  # CPU: the assumed figure (25 GB/s or --h2d-gbps)
    R["h2d_GBps"] = round(bw / 1e9, 2)
    floor = worker.offload_bytes_per_step / bw if worker.offload_active else None
    R["copy_floor_ms"] = round(floor * 1e3, 3) if floor else None
    say(f"pinned host-to-device: {bw / 1e9:.1f} GB/s ({'measured' if measured_bw else 'assumed'}); "
        f"copy floor {R['copy_floor_ms']} ms for {worker.offload_bytes_per_step / 1e9:.2f} GB per step")  # fmt: skip
    return floor


def _decode_phase(worker: Worker, args: argparse.Namespace, floor: float | None, R: dict) -> None:
    R["decode"] = []
    for b in args.batch_sizes:
        with phase(R, f"decode_b{b}"):
            s = common.summarize(common.time_steps(worker, b, args.context_len, args.steps, args.warmup), 1e3)
            entry = {"batch": b, "context": args.context_len, "step_ms": s["p50"], "mean_ms": s["avg"], "stats_ms": s,
                     "tok_s": round(b / (s["p50"] / 1e3), 1)}  # fmt: skip
            if floor:
                entry["floor_ms"] = round(floor * 1e3, 3)
                entry["ratio"] = round(s["p50"] / 1e3 / floor, 3)
            R["decode"].append(entry)
            say(f"decode batch {b}: p50 {s['p50']:.2f} ms (avg {s['avg']:.2f}, p90 {s['p90']:.2f}); "
                f"{entry.get('ratio')}x the copy floor; {entry['tok_s']} tok/s")  # fmt: skip


async def _engine_run(config: EngineConfig, worker: Worker, prompts: list[list[int]], output_len: int) -> dict:
    from aioffload.bench.throughput import measure_engine
    from aioffload.checkpoint.tokenizer import Tokenizer
    from aioffload.engine.async_engine import Engine

    engine = Engine(config, worker, Tokenizer.from_dir(config.model), "bench")
    try:
        return await measure_engine(engine, prompts, output_len)
    finally:
        await engine.shutdown(1.0)


def _resident_phase(cfg: EngineConfig, key: str, prompts: list[list[int]] | None, args: argparse.Namespace,
                    R: dict, greedy_off: list[list[int]] | None) -> None:  # fmt: skip
    """Build an all-resident worker; time batch-1 steps; with prompts, compare greedy tokens."""
    worker = common.build_worker(cfg)
    f = R["fit_vs_trigger1"]
    try:
        f[f"{key}_offloaded_layers"] = len(worker.placement.offloaded_layers)
        f[f"{key}_graphs"] = worker.graphs is not None
        if prompts is not None and greedy_off is not None:
            greedy_res = common.greedy_tokens(worker, prompts, args.check_tokens)
            mism = sum(a != b for x, y in zip(greedy_off, greedy_res) for a, b in zip(x, y))
            R["greedy"] = {"prompts": len(prompts), "tokens": args.check_tokens, "identical": greedy_off == greedy_res,
                           "mismatched_tokens": mism, "resident_graphs": worker.graphs is not None,
                           "offload": greedy_off, "resident": greedy_res}  # fmt: skip
            say(f"greedy: offloaded == all-resident: {greedy_off == greedy_res} ({mism} tokens differ)")
        s = common.summarize(common.time_steps(worker, 1, args.context_len, args.resident_steps, args.warmup), 1e3)
        f[f"{key}_step_ms"], f[f"{key}_stats_ms"] = s["p50"], s
        say(f"{key}: batch 1 step p50 {s['p50']:.3f} ms (graphs {'on' if worker.graphs else 'off'})")
    finally:
        del worker
        common.free_device_memory()


def _accelerate_phase(path: str, dtype: torch.dtype, dev: torch.device, args: argparse.Namespace, R: dict) -> None:
    reason = None
    if dev.type != "cuda":
        reason = "no CUDA device: Accelerate offload is a GPU baseline"
    elif args.skip_accelerate:
        reason = "--skip-accelerate"
    else:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            reason = "accelerate is not installed"
    if reason:
        R["accelerate"] = {"skipped": reason}
        say(f"accelerate: skipped ({reason})")
        return
    model = hf.load(path, dtype)  # host RAM; dispatch_model moves the budgeted part to the GPU
    try:
        A = {"gpu_budget": args.accelerate_gpu_budget, **hf.accelerate_offload(
            model, dev, args.accelerate_gpu_budget, args.accelerate_cpu_budget)}  # fmt: skip
        R["accelerate"] = A
        ours = {d["batch"]: d for d in R.get("decode", [])}
        with torch.no_grad():
            for b in args.accelerate_batch_sizes:
                s = hf.per_step(model, b, 32, model.config.vocab_size, dev, args.hf_new_tokens)
                A[f"bs{b}_s_per_step"] = round(s, 4)
                if b in ours:  # both means over several steps
                    A[f"speedup_bs{b}"] = round(s * 1e3 / ours[b]["mean_ms"], 2)
                say(f"accelerate batch {b}: {s:.3f} s/step; ours {ours.get(b, {}).get('mean_ms')} ms "
                    f"-> speedup {A.get(f'speedup_bs{b}')}")  # fmt: skip
    finally:
        del model
        common.free_device_memory()


def _table(R: dict) -> None:
    rows: list[list] = [["figure", "value", "reference", "ratio"]]
    plan = R.get("plan", {})
    rows.append(["trigger / resident+offloaded", f"{plan.get('trigger', 0):.4g}",
                 f"{plan.get('resident_layers')}+{plan.get('offloaded_layers')} layers", None])  # fmt: skip
    rows.append(["h2d GB/s", R.get("h2d_GBps"), "measured" if R.get("h2d_measured") else "assumed", None])
    for d in R.get("decode", []):
        rows.append([f"decode b={d['batch']} ms (p50)", d["step_ms"], d.get("floor_ms"), d.get("ratio")])
    e = R.get("engine")
    if e:
        rows.append([f"engine {e['num_prompts']} req out tok/s", e["output_tok_s"], e.get("target_tok_s"),
                     e.get("ratio_to_target")])  # fmt: skip
    if "greedy" in R:
        rows.append(["greedy offload == resident", R["greedy"]["identical"], None, None])
    rows += hybrid.table_rows(R)
    f = R.get("fit_vs_trigger1", {})
    rows.append([f"b=1 ms trigger {f.get('fit_trigger')} vs 1.0", f.get("trigger_fit_step_ms"),
                 f.get("trigger_1_step_ms"), f.get("ratio")])  # fmt: skip
    A = R.get("accelerate", {})
    if "skipped" in A:
        rows.append(["accelerate", "skipped", None, None])
    for key in (k for k in A if k.endswith("_s_per_step")):
        b = key.removesuffix("_s_per_step")
        rows.append([f"accelerate {b} s/step", A[key], "speedup", A.get(f"speedup_{b}")])
    if R["errors"]:
        rows.append(["errors", ", ".join(R["errors"]), None, None])
    common.print_table(rows)
