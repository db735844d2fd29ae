"""The hybrid phase of `aioffload bench offload` (issue 11): the same placement with the host
computing a share of every offloaded layer, against `--hybrid off` in the same run.

The hybrid worker is the process's first by default (`--hybrid-order first`): a server is a fresh
process. In the sixth session the bench built it second, after the `--hybrid off` worker, and its
host shares ran 1.3-1.8x slower than in fresh processes in calls 2, 5 and 9; not in call 7,
whose second worker was its fastest (BENCHMARKS.md). `last` keeps the old order.

Per batch size: the measured decode step, the copy floor, the host-only floor (calibrated host
time for all offloaded layers' MLPs, attention excluded), the cost model's predicted split
step (offloaded layers only) and the share it chose; then 64 greedy tokens against the
`--hybrid off` run, with the top-2 logit gap of the first divergence if there is one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aioffload.bench import common
from aioffload.bench.common import say
from aioffload.config import EngineConfig
from aioffload.worker.worker import Worker


def hybrid_phase(cfg: EngineConfig, args: argparse.Namespace, R: dict, prompts: list[list[int]],
                 floor_of: Callable[[Worker], float | None]) -> common.Greedy | None:  # fmt: skip
    """Build the hybrid worker, time its decode steps and take its greedy tokens (None when the
    worker chose no split); `compare` then sets them against the `--hybrid off` run."""
    common.reset_peak_rss()
    worker = common.build_worker(cfg)
    try:
        hp = worker.hybrid
        H: dict = {"mode": cfg.offload.hybrid, "on": hp is not None, "decode": []}
        R["hybrid"] = H
        if hp is None:
            say("hybrid: the worker chose no split (see its log)")
            return None
        n_off = len(worker.placement.offloaded_layers)
        c = hp.split.num_chunks
        H.update(threads=hp.host.threads, num_chunks=c, chunk_bytes=hp.cost.chunk_bytes,
                 max_host_chunks=hp.host.max_chunks, cost_table=hp.cost.table(args.batch_sizes),
                 host_rates={"batch_sizes": hp.cost.host.batch_sizes,
                             "per_chunk_ms": [round(x * 1e3, 5) for x in hp.cost.host.per_chunk_s],
                             "fixed_ms": [round(x * 1e3, 4) for x in hp.cost.host.fixed_s]})  # fmt: skip
        H["host_memory"] = host_memory(worker)
        floor_s = floor_of(worker)
        for b in args.batch_sizes:
            with common.phase(R, f"hybrid_decode_b{b}"):
                s = common.summarize(common.time_steps(worker, b, args.context_len, args.steps, args.warmup), 1e3)
                k = hp.chooser(b)
                e = {"batch": b, "host_chunks": k, "host_share": round(k / c, 3), "step_ms": s["p50"],
                     "mean_ms": s["avg"], "stats_ms": s, "tok_s": round(b / (s["p50"] / 1e3), 1),
                     "predicted_split_ms": round(n_off * hp.chooser.scaled(b).layer_s(b, k) * 1e3, 2),
                     "host_time_factor": round(hp.chooser.factor[b], 3) if b < len(hp.chooser.factor) else None,
                     "host_only_floor_ms": round(n_off * hp.cost.host.seconds(b, c) * 1e3, 2)}  # fmt: skip
                if floor_s:
                    e["floor_ms"] = round(floor_s * 1e3, 3)
                    e["ratio_to_floor"] = round(s["p50"] / 1e3 / floor_s, 3)
                H["decode"].append(e)
                say(f"hybrid decode batch {b}: p50 {s['p50']:.2f} ms, host {k}/{c} chunks; "
                    f"{e.get('ratio_to_floor')}x the copy floor; "
                    f"predicted {e['predicted_split_ms']} ms, host-only {e['host_only_floor_ms']} ms")  # fmt: skip
        greedy = None
        with common.phase(R, "hybrid_greedy"):
            greedy = common.greedy_with_gaps(worker, prompts, args.check_tokens)
        return greedy
    finally:
        del worker
        common.free_device_memory()


def host_memory(worker: Worker) -> dict:
    """The hybrid worker's peak RSS against the offload bound with its down copies added:
    1.1 x offloaded + the copies + 2 GB (DESIGN.md section 3)."""
    from aioffload.offload.split_mlp import SplitMlp

    mlp = worker.model.mlp
    copies = sum(t.numel() * t.element_size() for t in mlp.down.values()) if isinstance(mlp, SplitMlp) else 0
    off_gb, copies_gb = worker.placement.host_weight_bytes / 1e9, copies / 1e9
    m = {"peak_rss_gb": round(common.peak_rss_bytes() / 1e9, 3), "offloaded_gb": round(off_gb, 3),
         "down_copies_bytes": copies, "down_copies_gb": round(copies_gb, 3),
         "rss_limit_gb": round(1.1 * off_gb + copies_gb + 2, 3)}  # fmt: skip
    say(f"hybrid: host RSS peak {m['peak_rss_gb']} GB for {m['offloaded_gb']} GB offloaded and "
        f"{m['down_copies_gb']} GB of down copies (limit {m['rss_limit_gb']} GB)")  # fmt: skip
    return m


def compare(R: dict, args: argparse.Namespace, greedy_off: common.Greedy | None,
            greedy_hybrid: common.Greedy | None) -> None:  # fmt: skip
    """The hybrid run against `--hybrid off` in the same run: step time per batch size and the
    first greedy divergence with its top-2 logit gaps, if any."""
    H = R.get("hybrid") or {}
    off = {d["batch"]: d for d in R.get("decode", [])}
    for e in H.get("decode", []):
        if e["batch"] in off:
            e["ratio_to_off"] = round(e["step_ms"] / off[e["batch"]]["step_ms"], 3)
            say(f"hybrid decode batch {e['batch']}: {e['ratio_to_off']}x --hybrid off")
    if greedy_off is None or greedy_hybrid is None:
        return
    toks, gaps = greedy_hybrid
    ref_toks, ref_gaps = greedy_off
    div = common.first_divergence(ref_toks, toks)
    G = {"tokens": args.check_tokens, "prompts": len(toks), "identical": div is None}
    if div is not None:
        p, j = div
        G.update(first_divergence={"prompt": p, "position": j},
                 off_top2_gap=round(ref_gaps[p][j], 5), hybrid_top2_gap=round(gaps[p][j], 5))  # fmt: skip
    H["greedy"] = G
    say(f"hybrid greedy vs --hybrid off over {args.check_tokens} tokens: {G}")


def table_rows(R: dict) -> list[list]:
    H = R.get("hybrid") or {}
    rows: list[list] = []
    for d in H.get("decode", []):
        rows.append([f"hybrid b={d['batch']} ms (host {d['host_share']:.0%})", d["step_ms"], d.get("floor_ms"),
                     d.get("ratio_to_floor")])  # fmt: skip
        rows.append(["  vs --hybrid off / predicted / host-only", d.get("ratio_to_off"), d["predicted_split_ms"],
                     d["host_only_floor_ms"]])  # fmt: skip
    if "host_memory" in H:
        m = H["host_memory"]
        rows.append(["hybrid peak RSS GB (down copies)", m["peak_rss_gb"], f"limit {m['rss_limit_gb']}",
                     m["down_copies_gb"]])  # fmt: skip
    if "greedy" in H:
        g = H["greedy"]
        rows.append(["hybrid greedy == off", g["identical"], g.get("first_divergence"), g.get("off_top2_gap")])
    return rows
