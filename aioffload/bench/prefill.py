"""Long prompts (issue 14): time to first token resident and offloaded against transformers sdpa
and the compute floor, decode at long contexts against the HBM floor, decodes' ITL while a long
prompt prefills, and the attention kernels alone.

One GPU run, phases in the order that fits memory: attention kernels, the all-resident
worker, transformers (sdpa, all on the GPU), then the offloaded worker on an emulated card
(`bench offload`'s 24 GB emulation: --resident-gb of weights stay on the GPU). TTFT is a
lone prompt through Worker.execute in the chunks the scheduler would give it (the worker's
token budget). The compute floor of an n-token prompt is (2 x layer params x n + causal
attention FLOPs) at the dense matmul rate measured in the same run (a 5-call burst), and beside
it the same floor at the rate that matmul holds for ~1 s (an H200 at its ~700 W cap clocks ~1450
MHz against ~1980 in a burst: BENCHMARKS.md, fourth session, call 1); the HBM floor of a
decode step is every weight plus the context's K/V over the measured device copy rate. A
failed phase is recorded in the JSON and the others go on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from aioffload.bench import common
from aioffload.bench.common import phase, say
from aioffload.bench.itl_under_prefill import STREAM_PROMPT, STREAM_ROOM, itl_under_prefill
from aioffload.bench.served_decode import served_decode
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import EngineConfig, ModelConfig
from aioffload.model.layout import layer_layout
from aioffload.worker.worker import Worker, pick_device

NAME = "prefill"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lens", type=common.int_list, default=[2000, 8000, 32000],
                   help="prompt tokens of the TTFT runs (default: 2000,8000,32000)")  # fmt: skip
    p.add_argument("--decode-contexts", type=common.int_list, default=[1000, 8000, 32000],
                   help="contexts of the batch-1 decode runs (default: 1000,8000,32000)")  # fmt: skip
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per context (median)")
    p.add_argument("--reps", type=int, default=2, help="TTFT runs per prompt length below 16k (median); 1 above")
    p.add_argument("--itl-streams", type=int, default=16, help="requests decoding when the long prompt arrives")
    p.add_argument("--itl-prompt-len", type=int, default=8000, help="the long prompt of the ITL run")
    p.add_argument("--itl-tokens", type=int, default=24, help="tokens per stream timed before it arrives")
    p.add_argument("--served-tokens", type=int, default=96,
                   help="timed tokens of the served batch-1 decode (lookahead off and on; 0: skip)")  # fmt: skip
    p.add_argument("--resident-gb", type=float, default=6.0,
                   help="offloaded phase: GB of weights kept on the GPU, as in `bench offload`")  # fmt: skip
    p.add_argument("--resident-layers", type=int, default=None, help="offloaded phase: keep exactly this many layers")
    p.add_argument("--flex-length", type=int, default=8000, help="prompt length FlexAttention is compiled for")
    p.add_argument("--skip-kernels", action="store_true", help="skip the attention-kernel comparison")
    p.add_argument("--skip-hf", action="store_true", help="skip transformers")
    p.add_argument("--skip-offload", action="store_true", help="skip the offloaded worker")
    common.add_synthetic_args(p, default="llama3-8b")


def long_context_view(path: str, positions: int) -> str:
    """The checkpoint at `path`, or, when its max_position_embeddings is below `positions`, a
    sibling folder of links to its files with that limit raised (random weights know no length)."""
    src = Path(path)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("max_position_embeddings", 0) >= positions:
        return path
    dst = src.with_name(f"{src.name}-ctx{positions}")
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    (dst / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": positions}, indent=1))
    return str(dst)


SUSTAINED_REPS = 1000  # ~1 s of the fused gate/up matmul at 2048 rows on an H200


def compute_floor_s(mcfg: ModelConfig, n: int, dense_flops: float) -> float:
    """An n-token prompt's dense and causal-attention FLOPs at the measured matmul rate."""
    dense = 2 * mcfg.num_layers * layer_layout(mcfg).numel * n
    attention = 4 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * n * (n + 1) / 2
    return (dense + attention) / dense_flops


def run(config: EngineConfig, args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    R: dict = {"bench": NAME, "torch": torch.__version__, "errors": {}}
    with phase(R, "checkpoint"):
        config = common.resolve_model(config, args)
        longest = max(*args.prompt_lens, *args.decode_contexts, args.itl_prompt_len) + args.decode_steps + 8
        longest = max(longest, STREAM_PROMPT + STREAM_ROOM)
        config = config.replace(model=long_context_view(config.model, longest))
    if "checkpoint" in R["errors"]:
        common.write_json("prefill.json", R)
        return 1
    ckpt = Checkpoint.open(config.model)
    mcfg, dev = ckpt.model_config, pick_device(config.device)
    dtype = ckpt.resolve_dtype(config.dtype, dev)
    streams = args.itl_streams
    base = common.with_scheduler(config, max_num_seqs=max(config.scheduler.max_num_seqs, streams + 1),
                                 max_model_len=max(config.scheduler.max_model_len or 0, longest))  # fmt: skip
    R.update(model=config.model, device=common.device_name(dev), dtype=str(dtype), prompt_lens=args.prompt_lens)
    with phase(R, "rates"):
        R["rates"] = _rates(dev, dtype, mcfg)
    if dev.type == "cuda" and not args.skip_kernels:
        from aioffload.bench.attention_kernels import run_kernels

        run_kernels(dev, args.prompt_lens, args.flex_length, R)
    with phase(R, "resident"):
        worker = common.build_worker(base)
        try:
            _worker_phases(worker, "resident", args, R)
        finally:
            del worker
            common.free_device_memory()
    if not args.skip_hf:
        with phase(R, "hf"):
            R["hf"] = _hf_ttft(config.model, dtype, dev, args)
    if not args.skip_offload:
        with phase(R, "offloaded"):
            from aioffload.bench.offload import emulated_offload

            worker = common.build_worker(emulated_offload(base, mcfg, dtype.itemsize, args.resident_gb,
                                                              args.resident_layers))  # fmt: skip
            try:
                _worker_phases(worker, "offloaded", args, R)
            finally:
                del worker
                common.free_device_memory()
    _compare(R)
    R["total_s"] = round(time.perf_counter() - t_start, 1)
    common.write_json("prefill.json", R)
    _table(R)
    return 0 if not R["errors"] else 1


def _rates(dev: torch.device, dtype: torch.dtype, mcfg: ModelConfig) -> dict:
    """Dense matmul FLOP/s, device copy and host-to-device bytes/s (CPU: host figures, no H2D)."""
    from aioffload.worker.step_cost import measure_dense_flops

    if dev.type == "cuda":
        flops = measure_dense_flops(dev, dtype, mcfg.hidden_size, mcfg.intermediate_size)
    else:  # the same matmul on the host, timed with the wall clock
        x = torch.randn(256, mcfg.hidden_size, dtype=dtype)  # [T, H]
        w = torch.randn(2 * mcfg.intermediate_size, mcfg.hidden_size, dtype=dtype)  # [2I, H]
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        flops = 2 * 256 * mcfg.hidden_size * 2 * mcfg.intermediate_size / (time.perf_counter() - t)
    h2d = common.measure_h2d(dev, max(layer_layout(mcfg).numel * dtype.itemsize, 64 << 20))
    d2d = common.measure_d2d(dev)
    rates = {"dense_flops": flops, "dense_tflops": round(flops / 1e12, 3), "d2d_GBps": round(d2d / 1e9, 1),
             "h2d_GBps": round(h2d / 1e9, 1) if h2d else None}  # fmt: skip
    if dev.type == "cuda":  # the same matmul for ~1 s: the rate a long prefill holds once the card hits its power cap
        sustained = measure_dense_flops(dev, dtype, mcfg.hidden_size, mcfg.intermediate_size, reps=SUSTAINED_REPS)
        rates.update(dense_sustained_flops=sustained, dense_sustained_tflops=round(sustained / 1e12, 3))
    say(f"dense matmul {rates['dense_tflops']} TFLOP/s; device copy {rates['d2d_GBps']} GB/s; "
        f"host-to-device {rates['h2d_GBps']} GB/s")  # fmt: skip
    return rates


def _worker_phases(worker: Worker, key: str, args: argparse.Namespace, R: dict) -> None:
    import asyncio

    W: dict = {"offloaded_layers": len(worker.placement.offloaded_layers), "graphs": worker.graphs is not None,
               "token_budget": worker.token_budget, "idle_token_budget": worker.idle_token_budget, "ttft": [],
               "decode": []}  # fmt: skip
    R[key] = W
    rates = R.get("rates", {})
    if worker.step_cost is not None:
        W["step_cost"] = worker.step_cost.describe()
    if worker.offload_active:  # measured H2D rate; on the CPU the worker's assumed one
        h2d = rates["h2d_GBps"] * 1e9 if rates.get("h2d_GBps") else worker.h2d_bytes_per_s
        W["copy_floor_ms"] = round(worker.offload_bytes_per_step / h2d * 1e3, 6)
    vocab = worker.model_config.vocab_size
    with phase(R, f"{key}_warmup"):  # compiles every kernel shape the prefill and decode runs use
        _ttft(worker, common.random_prompts(1, min(args.prompt_lens), vocab, seed=99)[0])
    for n in args.prompt_lens:
        with phase(R, f"{key}_ttft_{n}"):
            reps = args.reps if n < 16384 else 1
            timed = [_ttft(worker, common.random_prompts(1, n, vocab, seed=rep)[0]) for rep in range(reps)]
            runs, steps = [s for s, _ in timed], timed[0][1]
            ttft = sorted(runs)[len(runs) // 2]
            e: dict = {"tokens": n, "ms": round(ttft * 1e3, 3), "steps": steps}
            if rates.get("dense_flops"):
                floor = compute_floor_s(worker.model_config, n, rates["dense_flops"])
                e.update(compute_floor_ms=round(floor * 1e3, 6), x_compute_floor=round(ttft / floor, 3))
            if rates.get("dense_sustained_flops"):
                floor = compute_floor_s(worker.model_config, n, rates["dense_sustained_flops"])
                e.update(sustained_floor_ms=round(floor * 1e3, 6), x_sustained_floor=round(ttft / floor, 3))
            if "copy_floor_ms" in W:
                e["copy_floors"] = round(ttft * 1e3 / W["copy_floor_ms"], 3)
            W["ttft"].append(e)
            say(f"{key} TTFT {n} tokens: {e['ms']} ms in {e['steps']} steps; {e.get('x_compute_floor')}x the compute "
                f"floor; {e.get('copy_floors')} copy floors")  # fmt: skip
    for ctx in args.decode_contexts:
        with phase(R, f"{key}_decode_{ctx}"):
            W["decode"].append(_decode(worker, ctx, args.decode_steps, rates.get("d2d_GBps"), W.get("copy_floor_ms")))
    if worker.graphs is not None and args.served_tokens > 0:  # decode lookahead's case (engine/lookahead.py)
        with phase(R, f"{key}_served_decode"):
            ctx = min(args.decode_contexts)
            W["served_decode"] = sv = served_decode(worker, ctx, args.served_tokens)
            sv["floor_ms"] = floor = next((e.get("floor_ms") for e in W["decode"] if e["context"] == ctx), None)
            for mode in ("off", "auto"):
                if floor:
                    sv[mode]["x_floor"] = round(sv[mode]["gaps_ms"]["p50"] / floor, 3)
                say(f"{key} served decode ctx {ctx}, lookahead {mode} ({'on' if sv[mode]['lookahead'] else 'off'}): "
                    f"ITL p50 {sv[mode]['gaps_ms']['p50']} ms, mean {sv[mode]['mean_ms']} ms "
                    f"({sv[mode].get('x_floor')}x the HBM floor)")  # fmt: skip
    with phase(R, f"{key}_itl"):
        tokens = args.itl_tokens if not worker.offload_active else max(4, args.itl_tokens // 2)
        # A cold round first: a fresh process's first mixed step of this shape compiles Triton kernels
        # the warm-up did not reach (a 1.1-2.0 s step on the H200, fifth session); a server pays it once.
        W["itl_cold"] = asyncio.run(itl_under_prefill(worker, args.itl_streams, args.itl_prompt_len, 4))
        W["itl"] = asyncio.run(itl_under_prefill(worker, args.itl_streams, args.itl_prompt_len, tokens))
        i = W["itl"]
        say(f"{key}: {args.itl_streams} streams' ITL p99 {i['alone_ms']['p99']} ms alone, "
            f"{i['during_ms']['p99']} ms while a {args.itl_prompt_len}-token prompt prefills ({i['p99_ratio']}x); "
            f"its TTFT {i['ttft_ms']} ms")  # fmt: skip


def _ttft(worker: Worker, prompt: list[int]) -> tuple[float, int]:
    """(seconds from a lone prompt's first chunk to its first token, steps), chunked as the scheduler
    would with nobody decoding (the worker's idle budget, then its token budget)."""
    d = common.StepDriver(worker, [prompt], max_new_tokens=1)
    return d.prefill(), d.prefill_steps


def _decode(worker: Worker, ctx: int, steps: int, d2d_gbps: float | None, copy_floor_ms: float | None) -> dict:
    prompt = common.random_prompts(1, ctx, worker.model_config.vocab_size, seed=7)[0]
    d = common.StepDriver(worker, [prompt], max_new_tokens=steps + 3)
    d.prefill()
    d.decode(), d.decode()  # warm-up
    s = common.summarize([d.decode() for _ in range(steps)], 1e3)
    e: dict = {"context": ctx, "step_ms": s["p50"], "stats_ms": s}
    if d2d_gbps:
        w_bytes, kv_bytes = common.hbm_bytes_per_step(worker, 1, ctx)
        floor_ms = (w_bytes + kv_bytes) / (d2d_gbps * 1e9) * 1e3
        floor_ms = max(floor_ms, copy_floor_ms or 0.0)
        e.update(floor_ms=round(floor_ms, 3), x_floor=round(s["p50"] / floor_ms, 3), kv_gb=round(kv_bytes / 1e9, 3))
    say(f"decode at context {ctx}: p50 {s['p50']} ms; floor {e.get('floor_ms')} ms ({e.get('x_floor')}x)")
    return e


def _hf_ttft(path: str, dtype: torch.dtype, dev: torch.device, args: argparse.Namespace) -> dict:
    """transformers' forward of a lone prompt (sdpa, every weight on the device), logits of its last token."""
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=dev, attn_implementation="sdpa").eval()
    H: dict = {"load_s": round(time.perf_counter() - t, 1), "attn": str(m.config._attn_implementation), "ttft": []}
    vocab = m.config.vocab_size

    def once(model: torch.nn.Module, n: int, seed: int) -> float:
        ids = torch.tensor([common.random_prompts(1, n, vocab, seed)[0]], device=dev)  # [1, n]
        common.sync(dev)
        t = time.perf_counter()
        model(ids, logits_to_keep=1)
        common.sync(dev)
        return time.perf_counter() - t

    try:
        with torch.no_grad():
            once(m, min(128, min(args.prompt_lens)), 99)
            once(m, min(args.prompt_lens), 98)  # warm-up at a real length
            for n in args.prompt_lens:
                reps = args.reps if n < 16384 else 1
                runs = sorted(once(m, n, seed) for seed in range(reps))
                H["ttft"].append({"tokens": n, "ms": round(runs[len(runs) // 2] * 1e3, 2)})
                say(f"transformers ({H['attn']}) TTFT {n} tokens: {H['ttft'][-1]['ms']} ms")
    finally:
        del m
        common.free_device_memory()
    return H


def _compare(R: dict) -> None:
    """Resident TTFT over transformers' at each length, where both ran."""
    hf = {e["tokens"]: e["ms"] for e in R.get("hf", {}).get("ttft", [])}
    for e in R.get("resident", {}).get("ttft", []):
        if e["tokens"] in hf:
            e["hf_ms"] = hf[e["tokens"]]
            e["x_hf"] = round(e["ms"] / hf[e["tokens"]], 3)


def _table(R: dict) -> None:
    rows: list[list] = [["figure", "value", "reference", "ratio"]]
    r = R.get("rates", {})
    rows.append(["dense TFLOP/s | d2d GB/s", r.get("dense_tflops"), r.get("d2d_GBps"), None])
    if "dense_sustained_tflops" in r:
        rows.append(["dense TFLOP/s sustained ~1 s | burst", r["dense_sustained_tflops"], r.get("dense_tflops"), None])
    for k in R.get("kernels", []):
        best = max(k["paths"], key=lambda e: e["tflops"])
        ours = k["paths"][0]
        rows.append([f"attn {k['length']}: {ours['path']} TFLOP/s", ours["tflops"], best["path"], best["tflops"]])
    for s in R.get("split_kv", []):
        rows.append([f"decode attn ctx {s['context']} splits {s['splits']} us", s["us"], "GB/s", s["GBps"]])
    for key in ("resident", "offloaded"):
        W = R.get(key, {})
        for e in W.get("ttft", []):
            rows.append([f"{key} TTFT {e['tokens']} ms (vs transformers)", e["ms"], e.get("hf_ms"), e.get("x_hf")])
            rows.append([f"  vs compute floor ({e['steps']} steps)", e.get("compute_floor_ms"), None,
                         e.get("x_compute_floor")])  # fmt: skip
            if "sustained_floor_ms" in e:
                rows.append(["  vs floor at the sustained rate", e["sustained_floor_ms"], None, e["x_sustained_floor"]])
            if "copy_floors" in e:
                rows.append(["  copy floors", W.get("copy_floor_ms"), None, e["copy_floors"]])
        for e in W.get("decode", []):
            rows.append([f"{key} decode ctx {e['context']} ms", e["step_ms"], e.get("floor_ms"), e.get("x_floor")])
        sv = W.get("served_decode")
        if sv:
            for mode in ("off", "auto"):
                on = "on" if sv[mode]["lookahead"] else "off"
                rows.append([f"{key} served decode ctx {sv['context']} ITL p50 ms, lookahead {on}",
                             sv[mode]["gaps_ms"]["p50"], sv.get("floor_ms"), sv[mode].get("x_floor")])  # fmt: skip
        c = W.get("itl_cold")
        if c:
            rows.append([f"{key} ITL p99 during prefill ms, cold round", c["during_ms"]["p99"], c["alone_ms"]["p99"],
                         c["p99_ratio"]])  # fmt: skip
        i = W.get("itl")
        if i:
            rows.append([f"{key} ITL p99 during prefill ms", i["during_ms"]["p99"], i["alone_ms"]["p99"],
                         i["p99_ratio"]])  # fmt: skip
    if R["errors"]:
        rows.append(["errors", ", ".join(R["errors"]), None, None])
    common.print_table(rows)
