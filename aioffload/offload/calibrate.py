"""Start-up calibration of the host's MLP-share speed, with the real layer shapes.

In a thread with the same OpenMP team size as the host-compute thread, time the share of
`k_hi` and `k_lo` chunks at each batch size (median of a few runs after a warm-up) and fit
seconds = per_chunk x k + fixed. The runs rotate over weight copies larger together than the
host's last-level cache (300 MB on the H200 host): a step reads each offloaded layer once, from
DRAM, and timing one buffer over and over measured the cache (64.5 GB/s against 37 GB/s in
real steps). On CUDA the weight stream is kept busy meanwhile (pinned
host-to-device copies, polled, never synchronised on), since that is how the host computes
in a real step: DMA and host matmuls share the host's memory bandwidth (about 10-30% slower
on the H200 host, BENCHMARKS.md).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Sequence

import torch

from aioffload.offload.split_cost import HostRates
from aioffload.offload.split_layout import SplitLayout
from aioffload.offload.split_mlp import host_share

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def physical_cores() -> int:
    """Distinct (package, core) pairs this process may run on; the affinity count if unknown."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, phys = set(), None, "0"
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                cores.add((phys, value))
    except OSError:
        pass
    return len(cores) or len(allowed)


def default_host_threads() -> int:
    """Every physical core but one: the step thread launching GPU work keeps a core."""
    return max(1, physical_cores() - 1)


class _CopyLoad:
    """Keeps a side stream copying 64 MB host->device until stopped (event polling, no spin)."""

    def __init__(self, device: torch.device) -> None:
        self.host = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty_like(self.host, device=device)
        self.stream = torch.cuda.Stream(device)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="aioffload-calib-copy")

    def _run(self) -> None:
        done = [torch.cuda.Event(), torch.cuda.Event()]
        i = 0
        while not self.stop.is_set():  # two copies queued at all times: the link never idles
            with torch.cuda.stream(self.stream):
                self.dev.copy_(self.host, non_blocking=True)
            done[i % 2].record(self.stream)
            i += 1
            while i > 1 and not done[i % 2].query():
                time.sleep(2e-4)

    def __enter__(self) -> _CopyLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def calibrate_host(
    split: SplitLayout,
    dtype: torch.dtype,
    threads: int,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    device: torch.device | None = None,
    reps: int = 3,
    cache_bytes: int = 320 << 20,
) -> HostRates:
    """Measure the host share's speed for `split`'s shapes; `device` (CUDA) adds copy contention."""
    c = split.num_chunks
    k_hi = max(1, c // 2)
    k_lo = max(1, k_hi // 2) if k_hi > 1 else 0
    result: dict[str, list[float]] = {"per": [], "fixed": []}
    elem = torch.empty((), dtype=dtype).element_size()
    share_bytes = k_hi * 3 * split.chunk * split.hidden * elem
    copies = max(1, min(8, -(-cache_bytes // share_bytes) + 1))  # > the cache together

    def run() -> None:
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(0)
        weights = []
        for _ in range(copies):
            gate_up = torch.empty(k_hi * 2 * split.chunk, split.hidden, dtype=dtype).normal_(0, 0.02, generator=gen)
            down = torch.empty(split.hidden, k_hi * split.chunk, dtype=dtype).normal_(0, 0.02, generator=gen)
            weights.append((gate_up, down))  # as the host reads them: gate|up rows, down columns

        def timed(x: torch.Tensor, k: int) -> float:
            if k == 0:
                return 0.0
            views = [(gu[: k * 2 * split.chunk], dn[:, : k * split.chunk]) for gu, dn in weights]
            host_share(x, *views[-1], split.chunk)  # warm-up (allocator, oneDNN primitive)
            times = []
            for r in range(max(reps, len(views))):
                gu, dn = views[r % len(views)]
                t = time.perf_counter()
                host_share(x, gu, dn, split.chunk)
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        for b in batch_sizes:
            x = torch.randn(b, split.hidden, generator=gen).to(dtype)
            hi, lo = timed(x, k_hi), timed(x, k_lo)
            per = (hi - lo) / (k_hi - k_lo) if k_hi > k_lo else hi / k_hi
            per = max(per, hi / k_hi / 4)  # noise must not make chunks look free
            result["per"].append(per)
            result["fixed"].append(max(0.0, hi - per * k_hi))

    def go() -> None:
        th = threading.Thread(target=run, name="aioffload-calibrate")
        th.start()
        th.join()

    if device is not None and device.type == "cuda":
        with _CopyLoad(device):
            go()
    else:
        go()
    # Host time never falls with batch size: keep the fit monotone so interpolation is sane.
    per, fixed = result["per"], result["fixed"]
    for i in range(1, len(per)):
        per[i] = max(per[i], per[i - 1])
        fixed[i] = max(fixed[i], 0.0)
    return HostRates(tuple(batch_sizes), tuple(per), tuple(fixed), threads)
