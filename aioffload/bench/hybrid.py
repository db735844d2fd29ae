"""The hybrid phase of `aioffload bench offload` (issue 11): the same placement with the host
computing a share of every offloaded layer, against `--hybrid off` in the same run.

Per batch size: the measured decode step, the copy floor, the host-only floor (calibrated host
time for all offloaded layers' MLPs, attention excluded), the cost model's predicted split
step (offloaded layers only) and the share it chose; then 64 greedy tokens against the
`--hybrid off` run, with the top-2 logit gap of the first divergence if there is one.
"""

from __future__ import annotations

import argparse

from aioffload.bench import common
from aioffload.bench.common import say
from aioffload.config import EngineConfig


def hybrid_phase(cfg: EngineConfig, args: argparse.Namespace, floor_s: float | None, R: dict,
                 prompts: list[list[int]], greedy_off: common.Greedy | None) -> None:  # fmt: skip
    worker = common.build_worker(cfg)
    try:
        hp = worker.hybrid
        H: dict = {"mode": cfg.offload.hybrid, "on": hp is not None, "decode": []}
        R["hybrid"] = H
        if hp is None:
            say("hybrid: the worker chose no split (see its log)")
            return
        n_off = len(worker.placement.offloaded_layers)
        c = hp.split.num_chunks
        H.update(threads=hp.host.threads, num_chunks=c, chunk_bytes=hp.cost.chunk_bytes,
                 cost_table=hp.cost.table(args.batch_sizes),
                 host_rates={"batch_sizes": hp.cost.host.batch_sizes,
                             "per_chunk_ms": [round(x * 1e3, 5) for x in hp.cost.host.per_chunk_s],
                             "fixed_ms": [round(x * 1e3, 4) for x in hp.cost.host.fixed_s]})  # fmt: skip
        off = {d["batch"]: d for d in R.get("decode", [])}
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
                if b in off:
                    e["ratio_to_off"] = round(s["p50"] / off[b]["step_ms"], 3)
                H["decode"].append(e)
                say(f"hybrid decode batch {b}: p50 {s['p50']:.2f} ms, host {k}/{c} chunks; "
                    f"{e.get('ratio_to_floor')}x the copy floor, {e.get('ratio_to_off')}x --hybrid off; "
                    f"predicted {e['predicted_split_ms']} ms, host-only {e['host_only_floor_ms']} ms")  # fmt: skip
        if greedy_off is not None:
            with common.phase(R, "hybrid_greedy"):
                toks, gaps = common.greedy_with_gaps(worker, prompts, args.check_tokens)
                ref_toks, ref_gaps = greedy_off
                div = common.first_divergence(ref_toks, toks)
                G = {"tokens": args.check_tokens, "prompts": len(prompts), "identical": div is None}
                if div is not None:
                    p, j = div
                    G.update(first_divergence={"prompt": p, "position": j},
                             off_top2_gap=round(ref_gaps[p][j], 5), hybrid_top2_gap=round(gaps[p][j], 5))  # fmt: skip
                H["greedy"] = G
                say(f"hybrid greedy vs --hybrid off over {args.check_tokens} tokens: {G}")
    finally:
        del worker
        common.free_device_memory()


def table_rows(R: dict) -> list[list]:
    H = R.get("hybrid") or {}
    rows: list[list] = []
    for d in H.get("decode", []):
        rows.append([f"hybrid b={d['batch']} ms (host {d['host_share']:.0%})", d["step_ms"], d.get("floor_ms"),
                     d.get("ratio_to_floor")])  # fmt: skip
        rows.append(["  vs --hybrid off / predicted / host-only", d.get("ratio_to_off"), d["predicted_split_ms"],
                     d["host_only_floor_ms"]])  # fmt: skip
    if "greedy" in H:
        g = H["greedy"]
        rows.append(["hybrid greedy == off", g["identical"], g.get("first_divergence"), g.get("off_top2_gap")])
    return rows
