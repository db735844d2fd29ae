"""Sixth-session probe (issue 11): how fast can the host read its MLP share from DRAM, per kernel?

The hybrid split's batch-1 miss (0.620x against 0.6x) was put down to host DRAM bandwidth, but
shared/measure/cpu-layer shows an fp32 GEMV reading 151 GB/s from DRAM on this host where the
bf16 path reads 68. This probe times one host share (k = 56 of 112 chunks of Llama-3-8B: 176 MB
in bf16) per kernel variant, rotating over copies larger together than the L3, alone and with the
weight stream's pinned host-to-device copies running, at batch 1..16, in a thread with the host
pool's OpenMP team size. Prints a table; JSON under $OUT.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from aioffload.offload.calibrate import default_host_threads  # noqa: E402
from aioffload.offload.split_mlp import host_share, mlp_share, silu_mul_chunks  # noqa: E402

H, CH, K = 4096, 128, 56
COPIES = int(os.environ.get("COPIES", 16))
BATCHES = (1, 2, 4, 8, 16)
MK = torch.ops.mkldnn


class CopyLoad:
    def __init__(self) -> None:
        self.host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty_like(self.host, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop = threading.Event()
        self.bytes = 0
        self.t = 0.0
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        ev = [torch.cuda.Event(), torch.cuda.Event()]
        i, t0 = 0, time.perf_counter()
        while not self.stop.is_set():
            with torch.cuda.stream(self.stream):
                self.dev.copy_(self.host, non_blocking=True)
            ev[i % 2].record(self.stream)
            i += 1
            while i > 1 and not ev[i % 2].query():
                time.sleep(2e-4)
        torch.cuda.synchronize()
        self.bytes, self.t = i * self.host.numel(), time.perf_counter() - t0

    def __enter__(self) -> CopyLoad:
        self.th.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        self.th.join()


def main() -> None:
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    threads = int(os.environ.get("HOST_THREADS", default_host_threads()))
    res: dict = {"threads": threads, "rows": []}
    box: dict = {}

    def work() -> None:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        first = (torch.empty(K * 2 * CH, H, dtype=torch.bfloat16).normal_(0, 0.02, generator=g),
                 torch.empty(K * CH, H, dtype=torch.bfloat16).normal_(0, 0.02, generator=g))
        w16 = [first] + [(a.clone(), b.clone()) for a, b in [first] * (COPIES - 1)]  # distinct memory: DRAM reads
        w32 = [(a.float(), b.float()) for a, b in w16] if os.environ.get("ALL_VARIANTS") else []
        dn16 = [b.t().contiguous() for _, b in w16]  # down as [H, K ch] (linear's weight)
        kmax = int(os.environ.get("KMAX", 70))  # the host's down copy holds 70 chunks; the share reads 56 of them
        wide = [torch.cat([b.view(K, CH, H).flip(0).reshape(-1, H).t(),  # ascending chunks, as host_down_columns
                           torch.zeros(H, (kmax - K) * CH, dtype=b.dtype)], 1) for _, b in w16]
        res["setup_s"] = time.perf_counter() - t
        packed: dict[int, list] = {}
        for bs in (1, 16) if os.environ.get("ALL_VARIANTS") else ():
            try:
                t = time.perf_counter()
                packed[bs] = [(MK._reorder_linear_weight(a, bs), MK._reorder_linear_weight(d, bs))
                              for (a, _), d in zip(w16, dn16)]
                res[f"pack{bs}_s"] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001
                res[f"pack{bs}_error"] = repr(e)
        ref = torch.randn(int(os.environ.get("REF_M", 512)) << 20, generator=g)  # 2 GB fp32
        share_mb = K * 3 * CH * H * 2 / 1e6

        def v_plain(x, i):
            return mlp_share(x, *w16[i], CH)

        def v_fp32(x, i):
            a, d = w32[i]
            return torch.matmul(silu_mul_chunks(F.linear(x.float(), a), CH), d)

        def v_mv(x, i):
            a, d = w16[i]
            act = silu_mul_chunks(torch.mv(a, x[0]).unsqueeze(0), CH)
            return torch.mv(d.t(), act[0]).unsqueeze(0)

        def v_lin_down(x, i):  # down through linear with [H, K ch] weights (not the split layout)
            act = silu_mul_chunks(F.linear(x, w16[i][0]), CH)
            return F.linear(act, dn16[i])

        def make_packed(bs):
            def f(x, i):
                a, d = packed[bs][i]
                act = silu_mul_chunks(MK._linear_pointwise(x, a, None, "none", [], ""), CH)
                return MK._linear_pointwise(act, d, None, "none", [], "")
            return f

        def v_host(x, i):  # today's host_share: ascending chunks, the down copy's strided first columns
            a, _ = w16[i]
            return host_share(x, a, wide[i][:, : K * CH], CH)

        variants = {"plain": v_plain, "lin_down": v_lin_down, "host_share": v_host}
        if os.environ.get("ALL_VARIANTS"):
            variants.update(fp32=v_fp32, mv=v_mv)
        for bs in packed:
            variants[f"packed{bs}"] = make_packed(bs)
        # correctness at batch 1 against plain (every variant reads the same rows in the same order)
        x1 = torch.randn(1, H, generator=g).bfloat16()
        errs = {}
        base = v_plain(x1, 0).float()
        for name, f in variants.items():
            try:
                o = f(x1, 0).float()
                errs[name] = float((o - base).abs().max() / base.abs().max())
            except Exception as e:  # noqa: BLE001
                errs[name] = repr(e)
        res["rel_err_vs_plain"] = errs

        def timed(f, x, reps=3):
            f(x, COPIES - 1)
            ts = []
            for r in range(reps * COPIES):
                t = time.perf_counter()
                f(x, r % COPIES)
                ts.append(time.perf_counter() - t)
            return statistics.median(ts)

        def sweep(label):
            t = time.perf_counter()
            ref.sum()
            s = ref.sum()
            res[f"fp32_sum_GBps_{label}"] = ref.numel() * 4 / ((time.perf_counter() - t) / 2) / 1e9
            del s
            for b in BATCHES:
                x = torch.randn(b, H, generator=g).bfloat16()
                for name, f in variants.items():
                    if name == "mv" and b > 1 or isinstance(errs.get(name), str):
                        continue
                    ms = timed(f, x) * 1e3
                    res["rows"].append({"load": label, "batch": b, "variant": name, "ms": ms,
                                        "bf16_GBps": share_mb / ms})

        sweep("alone")
        if torch.cuda.is_available():
            with CopyLoad() as cl:
                sweep("copy")
            res["copy_GBps_during"] = cl.bytes / cl.t / 1e9
        box["ok"] = True

    th = threading.Thread(target=work)
    th.start()
    th.join()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        x = torch.randn(1, H).bfloat16()
        w = torch.randn(2 * CH * 4, H).bfloat16()
        F.linear(x, w)
        try:
            MK._linear_pointwise(x, MK._reorder_linear_weight(w, 1), None, "none", [], "")
        except Exception as e:  # noqa: BLE001
            print("packed verbose failed", e)
    json.dump(res, open(os.path.join(out_dir, "probe_s7_host.json"), "w"), indent=1)
    print({k: v for k, v in res.items() if k != "rows"})
    print(f"{'load':6} {'b':>3} " + " ".join(f"{n:>10}" for n in sorted({r['variant'] for r in res['rows']})))
    for load in ("alone", "copy"):
        for b in BATCHES:
            rows = {r["variant"]: r for r in res["rows"] if r["load"] == load and r["batch"] == b}
            print(f"{load:6} {b:3d} " + " ".join(
                f"{rows[n]['bf16_GBps']:10.1f}" if n in rows else f"{'-':>10}"
                for n in sorted({r['variant'] for r in res['rows']})))
    print("(GB/s of the bf16 share's bytes, 176 MB; ms = 176 / that)")


if __name__ == "__main__":
    main()
