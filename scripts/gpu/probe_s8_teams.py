"""Seventh-session probe (issue 11), prepared without a GPU: is the host share's spread a straggler?

The host share runs as one OpenMP team of 15 threads, and oneDNN splits its GEMV statically over
them, so a share takes as long as its slowest thread. On the lent H200 VMs the share's calibrated
time swung from 55 to 130 us a chunk between processes minutes apart, and a few shares of a step
took 3-4x the others (BENCHMARKS.md, sixth session). If one descheduled or slowed core makes the
whole team wait, smaller teams fed from a queue would lose less: a slow team takes fewer pieces.

Times one batch-1 share of K = 64 chunks of Llama-3-8B (201 MB in bf16: gate|up rows from pinned
memory, down columns as the host's copy), rotating over copies larger together than the L3, beside
a pinned host-to-device copy stream (on CUDA), for:
- `static T`: today's kernel, one team of T threads (T = 15, 14, 12);
- `teams P x T`: P teams of T threads, chunk ranges split evenly, partials summed;
- `queue P x T`: P teams of T threads pulling 3P pieces from a queue, partials summed;
each once quiet and once beside a thread that emulates the step thread (small ops in a loop,
taking the GIL between them). Prints p50 / p90 / max per variant; JSON under $OUT.

CPU smoke run: SMALL=1 python3 scripts/gpu/probe_s8_teams.py
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.getcwd())
from aioffload.offload.calibrate import default_host_threads  # noqa: E402
from aioffload.offload.split_mlp import host_share  # noqa: E402

SMALL = bool(os.environ.get("SMALL"))
H, CH, K = (256, 16, 8) if SMALL else (4096, 128, 64)
COPIES = int(os.environ.get("COPIES", 2 if SMALL else 16))
SHARES = int(os.environ.get("SHARES", 20 if SMALL else 150))
CUDA = torch.cuda.is_available()


class CopyLoad:
    """Two 256 MB pinned host-to-device copies queued at all times (the weight stream)."""

    def __init__(self) -> None:
        self.host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty_like(self.host, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop = threading.Event()
        self.n = 0
        self.seconds = 0.0
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        ev = [torch.cuda.Event(), torch.cuda.Event()]
        t0 = time.perf_counter()
        while not self.stop.is_set():
            with torch.cuda.stream(self.stream):
                self.dev.copy_(self.host, non_blocking=True)
            ev[self.n % 2].record(self.stream)
            self.n += 1
            while self.n > 1 and not ev[self.n % 2].query():
                time.sleep(2e-4)
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - t0

    @property
    def gbps(self) -> float:
        return self.n * self.host.numel() / max(self.seconds, 1e-9) / 1e9


class StepThread:
    """Emulates the step thread beside the host pool: small ops in a loop, the GIL taken for each."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        x = torch.zeros(4096, device="cuda" if CUDA else "cpu")
        while not self.stop.is_set():
            for _ in range(32):
                x.add_(1.0)
            if CUDA:
                torch.cuda.current_stream().synchronize()
            time.sleep(1e-4)


class Teams:
    """P persistent threads, each with its own OpenMP team of T threads, computing pieces of a share."""

    def __init__(self, p: int, t: int) -> None:
        self.p, self.t = p, t
        self.q: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.ths = [threading.Thread(target=self.run, daemon=True) for _ in range(p)]
        for th in self.ths:
            th.start()

    def run(self) -> None:
        torch.set_num_threads(self.t)
        while True:
            job = self.q.get()
            if job is None:
                return
            x, gu, dn, out = job
            host_share(x, gu, dn, CH, out=out)
            self.done.put(1)

    def share(self, x: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor, pieces: int, outs: torch.Tensor) -> None:
        bounds = [K * i // pieces for i in range(pieces + 1)]
        for i in range(pieces):
            a, b = bounds[i], bounds[i + 1]
            self.q.put((x, gu[a * 2 * CH : b * 2 * CH], dn[:, a * CH : b * CH], outs[i]))
        for _ in range(pieces):
            self.done.get()
        outs[:pieces].sum(0)  # the partials meet (in the product: on the GPU, or in one fp32 sum)

    def close(self) -> None:
        for _ in self.ths:
            self.q.put(None)
        for th in self.ths:
            th.join()


def stats(ts: list[float], nbytes: int) -> dict:
    ts = sorted(ts)
    p50 = statistics.median(ts)
    return {"p50_ms": round(p50 * 1e3, 3), "p90_ms": round(ts[int(0.9 * (len(ts) - 1))] * 1e3, 3),
            "max_ms": round(ts[-1] * 1e3, 3), "mean_ms": round(statistics.fmean(ts) * 1e3, 3),
            "GBps_p50": round(nbytes / p50 / 1e9, 1)}  # fmt: skip


def main() -> None:
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    top = int(os.environ.get("HOST_THREADS", default_host_threads()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    t0 = time.perf_counter()
    weights = []
    for _ in range(COPIES):
        gu = torch.empty(K * 2 * CH, H, dtype=torch.bfloat16, pin_memory=CUDA).normal_(0, 0.02, generator=g)
        dn = torch.empty(H, K * CH, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        weights.append((gu, dn))
    nbytes = 3 * K * CH * H * 2
    print(f"{COPIES} copies of a {nbytes / 1e6:.0f} MB share in {time.perf_counter() - t0:.1f} s; {top} threads")
    ref = host_share(x, *weights[0], CH)

    static_ts = sorted({top, max(1, top - 1), max(1, top - 3)}, reverse=True)
    layouts = [(p, top // p) for p in (3, 5) if top // p >= 1]
    variants: list[tuple[str, Callable[[], Callable[[int], None]], Callable[[], None]]] = []

    for t in static_ts:
        box: dict = {}

        def make(t: int = t, box: dict = box) -> Callable[[int], None]:
            box["teams"] = tm = Teams(1, t)
            outs = torch.empty(1, 1, H, dtype=torch.bfloat16)
            return lambda r: tm.share(x, *weights[r % COPIES], 1, outs)

        variants.append((f"static {t}", make, lambda box=box: box["teams"].close()))
    for mode in ("teams", "queue"):
        for p, t in layouts:
            box = {}

            def make(p: int = p, t: int = t, box: dict = box, mode: str = mode) -> Callable[[int], None]:
                box["teams"] = tm = Teams(p, t)
                pieces = p if mode == "teams" else 3 * p
                outs = torch.empty(pieces, 1, H, dtype=torch.bfloat16)
                return lambda r: tm.share(x, *weights[r % COPIES], pieces, outs)

            variants.append((f"{mode} {p}x{t}", make, lambda box=box: box["teams"].close()))

    # Each variant's result against today's kernel (bf16 partials summed: rounding only).
    rows = []
    load = CopyLoad() if CUDA else None
    if load is not None:
        load.th.start()
    try:
        for busy in (False, True):
            step = StepThread() if busy else None
            if step is not None:
                step.th.start()
            try:
                for name, make, close in variants:
                    run = make()
                    for r in range(3):
                        run(r)  # warm-up: oneDNN primitives, thread teams
                    ts = []
                    for r in range(SHARES):
                        t = time.perf_counter()
                        run(r)
                        ts.append(time.perf_counter() - t)
                    close()
                    row = {"variant": name, "step_thread": busy, **stats(ts, nbytes)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                if step is not None:
                    step.stop.set()
                    step.th.join()
    finally:
        if load is not None:
            load.stop.set()
            load.th.join()

    # Equality: one queued share against today's kernel.
    tm = Teams(3, max(1, top // 3))
    outs = torch.empty(9, 1, H, dtype=torch.bfloat16)
    bounds = [K * i // 9 for i in range(10)]
    gu, dn = weights[0]
    for i in range(9):
        a, b = bounds[i], bounds[i + 1]
        tm.q.put((x, gu[a * 2 * CH : b * 2 * CH], dn[:, a * CH : b * CH], outs[i]))
    for _ in range(9):
        tm.done.get()
    tm.close()
    got = outs.float().sum(0)
    rel = float((got - ref.float()).norm() / ref.float().norm())
    res = {"threads": top, "share_mb": nbytes / 1e6, "copies": COPIES, "shares": SHARES, "rows": rows,
           "queued_vs_static_rel_err": rel,
           "copy_GBps": round(load.gbps, 1) if load is not None else None}  # fmt: skip
    with open(os.path.join(out_dir, "probe_s8_teams.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"queued 9 pieces (fp32 sum) vs one team: relative error {rel:.2e}; copies {res['copy_GBps']} GB/s")
    print(f"{'variant':<14} {'step thread':<11} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'GB/s':>6}")
    for r in rows:
        print(f"{r['variant']:<14} {str(r['step_thread']):<11} {r['p50_ms']:>8} {r['p90_ms']:>8} {r['max_ms']:>8} "
              f"{r['GBps_p50']:>6}")  # fmt: skip


if __name__ == "__main__":
    main()
