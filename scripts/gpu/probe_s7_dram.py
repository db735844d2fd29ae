"""Sixth-session probe 2 (issue 11): the host share beside a weight stream that reads DRAM.

Call 2 measured real steps' host shares at 1.67x their calibrated time with the [H, K] down copies.
The calibration's copy load (and call 1's probe) copies one 64-256 MB pinned buffer over and over:
the 300 MB L3 may serve those DMA reads, while a real step streams 10 GB. Here each kernel runs for
~0.4 s beside copies from a pinned source of 256 MB (as the probe) or 2 GB (past the L3, as real
steps), and both the host's and the copies' rates are measured over the same window. Kernels: the
old share (down^T rows), today's (down columns, out= into mapped pinned memory), an fp32 sum.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from aioffload.offload.calibrate import default_host_threads  # noqa: E402
from aioffload.offload.pinned import mapped_pinned  # noqa: E402
from aioffload.offload.split_mlp import host_share, mlp_share  # noqa: E402

H, CH, K, KMAX, COPIES = 4096, 128, 56, 79, 16
WINDOW_S = 0.4


class CopyLoad:
    def __init__(self, src_bytes: int) -> None:
        self.piece = 64 << 20
        self.host = torch.empty(src_bytes, dtype=torch.uint8, pin_memory=True)
        self.host.fill_(1)
        self.dev = torch.empty(self.piece, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()

    def run(self, stop: threading.Event, out: dict) -> None:
        ev = [torch.cuda.Event() for _ in range(4)]
        n_pieces = self.host.numel() // self.piece
        i, t0 = 0, time.perf_counter()
        while not stop.is_set():
            off = (i % n_pieces) * self.piece
            with torch.cuda.stream(self.stream):
                self.dev.copy_(self.host[off : off + self.piece], non_blocking=True)
            ev[i % 4].record(self.stream)
            i += 1
            while i > 3 and not ev[(i - 3) % 4].query():
                time.sleep(1e-4)
        self.stream.synchronize()
        out["GBps"] = i * self.piece / (time.perf_counter() - t0) / 1e9


def main() -> None:
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    threads = default_host_threads()
    res: dict = {"threads": threads, "rows": []}
    loads = {"none": None, "256MB": CopyLoad(256 << 20), "2GB": CopyLoad(2 << 30)}

    def work() -> None:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        gu0 = torch.empty(K * 2 * CH, H, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        dt0 = torch.empty(K * CH, H, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        # as the worker has them: gate|up and down^T in pinned memory, the down copy pageable and wider
        gus = [torch.empty(gu0.shape, dtype=gu0.dtype, pin_memory=True).copy_(gu0) for _ in range(COPIES)]
        dts = [torch.empty(dt0.shape, dtype=dt0.dtype, pin_memory=True).copy_(dt0) for _ in range(COPIES)]
        cols = [torch.cat([dt0.view(K, CH, H).flip(0).reshape(-1, H).t(),
                           torch.zeros(H, (KMAX - K) * CH, dtype=dt0.dtype)], 1) for _ in range(COPIES)]
        out = mapped_pinned(16 * H, torch.bfloat16, torch.device("cuda"))[0].view(16, H)
        ref = torch.randn(512 << 20, generator=g)  # 2 GB fp32
        share_gb = K * 3 * CH * H * 2 / 1e9

        def old(x, i):
            mlp_share(x, gus[i], dts[i], CH, out=out[: x.shape[0]])

        def new(x, i):
            host_share(x, gus[i], cols[i][:, : K * CH], CH, out=out[: x.shape[0]])

        def new_no_out(x, i):
            host_share(x, gus[i], cols[i][:, : K * CH], CH)

        variants = {"old": old, "new": new, "new_no_out": new_no_out}
        for b in (1, 8):
            x = torch.randn(b, H, generator=g).bfloat16()
            for f in variants.values():
                f(x, 0)
        x1 = torch.randn(1, H, generator=g).bfloat16()
        old(x1, 0)
        o_old = out[:1].float().clone()
        new(x1, 0)
        res["new_vs_old_rel_err"] = float((out[:1].float() - o_old).abs().max() / o_old.abs().max())
        assert torch.isfinite(F.linear(x1, gus[0])).all()
        for load_name, load in loads.items():
            for b in (1, 8):
                x = torch.randn(b, H, generator=g).bfloat16()
                for name, f in list(variants.items()) + [("fp32_sum", None)]:
                    if name == "fp32_sum" and b > 1:
                        continue
                    stop, cr = threading.Event(), {}
                    th = threading.Thread(target=load.run, args=(stop, cr)) if load else None
                    if th:
                        th.start()
                        time.sleep(0.05)
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < WINDOW_S:
                        if f is None:
                            ref.sum()
                        else:
                            f(x, n % COPIES)
                        n += 1
                    dt = time.perf_counter() - t0
                    stop.set()
                    if th:
                        th.join()
                    gb = (ref.numel() * 4 / 1e9) if f is None else share_gb
                    res["rows"].append({"load": load_name, "batch": b, "variant": name, "host_GBps": n * gb / dt,
                                        "copy_GBps": cr.get("GBps", 0.0)})

    th = threading.Thread(target=work)
    th.start()
    th.join()
    json.dump(res, open(os.path.join(out_dir, "probe_s7_dram.json"), "w"), indent=1)
    print(f"{'load':6} {'b':>2} {'variant':12} {'host GB/s':>9} {'copy GB/s':>9} {'sum':>6}")
    for r in res["rows"]:
        print(f"{r['load']:6} {r['batch']:2d} {r['variant']:12} {r['host_GBps']:9.1f} {r['copy_GBps']:9.1f} "
              f"{r['host_GBps'] + r['copy_GBps']:6.1f}")


if __name__ == "__main__":
    main()
