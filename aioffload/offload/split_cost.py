"""The cost model of a split offloaded layer, and the split chooser (pure arithmetic).

For a step of T tokens with the host computing k of the C chunks of every offloaded layer:

    copy(k)  = (layer bytes - k x chunk bytes) / host-to-device bandwidth
    host(k)  = host_rates(T, k) + sync                      (k > 0; sync: event wake, future, add)
    gpu(k)   = GPU time of its share: 2 x (params - k x chunk params) x T / dense rate
    layer(k) = max(copy(k), host(k), gpu(k))                the three lanes run at once

and the chooser takes the k with the smallest layer(k) (the smaller k on ties), so k = 0
wherever the host is slower than streaming the whole layer. On the CPU device the "GPU"
share is a CPU computation too, timed with the same calibrated rates.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aioffload.offload.split_layout import SplitLayout


def hybrid_off_reason(mode: str, is_moe: bool, cuda: bool) -> str | None:
    """Why offloaded layers stream whole instead of splitting with the host (None: they split).
    One rule for the worker (worker/hybrid.py) and `aioffload plan`."""
    if is_moe:
        return "an MoE model streams its routed experts instead"
    if mode == "off":
        return "--hybrid off: offloaded layers stream whole"
    if mode == "auto" and not cuda:
        return "auto on the CPU device: nothing to gain; --hybrid on runs the split here too"
    return None


@dataclass(frozen=True)
class HostRates:
    """Measured host time of an MLP share at each calibrated batch: seconds = per_chunk x k + fixed.
    Between batches, linear interpolation; beyond the largest, no host share is offered."""

    batch_sizes: tuple[int, ...]
    per_chunk_s: tuple[float, ...]
    fixed_s: tuple[float, ...]
    threads: int

    @property
    def max_tokens(self) -> int:
        return self.batch_sizes[-1]

    def seconds(self, tokens: int, k: int) -> float:
        if tokens > self.max_tokens:
            return math.inf
        b = self.batch_sizes
        i = bisect.bisect_left(b, tokens)
        if b[i] == tokens or i == 0:
            return self.per_chunk_s[i] * k + self.fixed_s[i]
        w = (tokens - b[i - 1]) / (b[i] - b[i - 1])
        lo = self.per_chunk_s[i - 1] * k + self.fixed_s[i - 1]
        hi = self.per_chunk_s[i] * k + self.fixed_s[i]
        return lo + w * (hi - lo)


@dataclass(frozen=True)
class SplitCostModel:
    num_chunks: int
    chunk_bytes: int  # one chunk's gate + up + down^T bytes
    chunk_params: int
    layer_bytes: int  # bytes streamed when the host computes nothing (the whole layer)
    layer_params: int
    h2d_bytes_per_s: float
    host: HostRates
    sync_s: float = 250e-6  # per split layer: blocking-event wake + future + zero-copy add (H200: ~0.05-0.1 ms each)
    gpu_flops: float = 300e12  # dense rate counted on for the GPU share
    gpu_is_host: bool = False  # CPU device: the "GPU" share runs on the host too (same rates)
    host_scale: float = 1.0  # measured / calibrated host time (SplitChooser.observe)
    max_host_chunks: int | None = None  # the most chunks a host share may have (its down copies); None: all

    @classmethod
    def for_layout(cls, split: SplitLayout, elem: int, h2d: float, rates: HostRates,
                   gpu_is_host: bool = False) -> SplitCostModel:  # fmt: skip
        return cls(
            num_chunks=split.num_chunks, chunk_bytes=split.chunk_numel * elem, chunk_params=split.chunk_numel,
            layer_bytes=split.numel * elem, layer_params=split.numel, h2d_bytes_per_s=h2d, host=rates,
            gpu_is_host=gpu_is_host,
        )  # fmt: skip

    def layer_s(self, tokens: int, k: int) -> float:
        """Predicted seconds of one offloaded layer in a step of `tokens` tokens, host share k."""
        copy = (self.layer_bytes - k * self.chunk_bytes) / self.h2d_bytes_per_s
        if self.gpu_is_host:
            gpu = self.host.seconds(tokens, self.num_chunks - k) if k < self.num_chunks else 0.0
        else:
            gpu = 2.0 * (self.layer_params - k * self.chunk_params) * tokens / self.gpu_flops
        if k == 0:
            return max(copy, gpu)
        return max(copy, gpu, self.host_scale * self.host.seconds(tokens, k) + self.sync_s)

    def best_k(self, tokens: int) -> int:
        """The host share (chunks) with the smallest predicted layer time; 0 on ties or beyond the
        calibrated batches."""
        if tokens > self.host.max_tokens:
            return 0
        best, best_s = 0, self.layer_s(tokens, 0)
        top = self.num_chunks if self.max_host_chunks is None else min(self.max_host_chunks, self.num_chunks)
        for k in range(1, top + 1):
            s = self.layer_s(tokens, k)
            if s < best_s * (1 - 1e-9):
                best, best_s = k, s
        return best

    def table(self, batch_sizes: Sequence[int]) -> list[dict[str, float]]:
        """Rows for the start-up log and `aioffload plan`: per batch, the chosen share and the
        predicted layer time against streaming it whole."""
        rows = []
        for t in batch_sizes:
            k = self.best_k(t)
            rows.append({
                "tokens": t, "host_chunks": k, "host_share": round(k / self.num_chunks, 3),
                "layer_ms": round(self.layer_s(t, k) * 1e3, 3), "stream_ms": round(self.layer_s(t, 0) * 1e3, 3),
                "host_only_ms": round(self.host.seconds(t, self.num_chunks) * 1e3, 3),
            })  # fmt: skip
        return rows


class SplitChooser:
    """best_k for every step size up to the calibrated maximum, computed once, then corrected by
    what the host really takes in steps: per step size, a running ratio of measured to calibrated
    host time (the calibration cannot reproduce a real step's memory traffic exactly), with which
    that size's share is re-chosen. A step's shares move the ratio by their median: on the H200 a
    few shares of a step took 3-4x the others (15 ms against 4), and a running ratio over single
    shares, read at the step's end, had learnt 1.67x from them and cut the batch-1 share from 63
    chunks to 45 (BENCHMARKS.md, sixth session)."""

    def __init__(self, model: SplitCostModel, smoothing: float = 0.5, hysteresis: float = 0.03) -> None:
        self.model = model
        self.smoothing = smoothing  # per step, towards the median of its shares
        self.hysteresis = hysteresis  # re-choose only for a predicted gain above this fraction
        self._k = [0] + [model.best_k(t) for t in range(1, model.host.max_tokens + 1)]
        self.factor = [1.0] * len(self._k)  # measured / calibrated host time, per step size

    def __call__(self, tokens: int) -> int:
        return self._k[tokens] if tokens < len(self._k) else 0

    def observe_step(self, shares: Iterable[tuple[int, int, float]]) -> None:
        """A step's host shares (tokens, k, seconds), one per offloaded layer: per step size, the
        ratio moves once towards the median of the shares' ratios, and that size is re-chosen once
        (a choice costs a scan over every chunk count; per layer that was ~3 ms a step at 8B)."""
        by_size: dict[int, list[float]] = {}
        for tokens, k, host_s in shares:
            r = self.ratio(tokens, k, host_s)
            if r is not None:
                by_size.setdefault(tokens, []).append(r)
        for tokens, ratios in by_size.items():
            self.factor[tokens] += self.smoothing * (statistics.median(ratios) - self.factor[tokens])
            self.rechoose(tokens)

    def ratio(self, tokens: int, k: int, host_s: float) -> float | None:
        """Measured over calibrated host time of one share; None when it says nothing (no share)."""
        if not 0 < tokens < len(self._k) or k <= 0:
            return None
        predicted = self.model.host.seconds(tokens, k)
        return host_s / predicted if predicted > 0 else None

    def rechoose(self, tokens: int) -> None:
        scaled = self.scaled(tokens)
        best, now = scaled.best_k(tokens), self._k[tokens]
        # A share that changes every step costs top-up copies and jitter: move only for a real gain.
        if scaled.layer_s(tokens, best) < (1 - self.hysteresis) * scaled.layer_s(tokens, now):
            self._k[tokens] = best

    def scaled(self, tokens: int) -> SplitCostModel:
        """The cost model with the host time measured for this step size."""
        f = self.factor[tokens] if 0 < tokens < len(self.factor) else 1.0
        return dataclasses.replace(self.model, host_scale=f)

    @property
    def largest_share(self) -> int:
        """The most chunks any step size's host share has now."""
        return max(self._k)

    @property
    def pays(self) -> bool:
        """True when some calibrated step size gets a host share."""
        return any(self._k)


def host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def down_copy_budget(available_bytes: int | None, pinned_bytes: int) -> int | None:
    """The host memory the host's down copies may take: half of what is left once the offloaded
    layers are pinned (None where the memory available is unknown)."""
    return None if available_bytes is None else max(0, available_bytes - pinned_bytes) // 2


def host_copy_chunks(num_chunks: int, copy_bytes_per_chunk: int, budget_bytes: int | None) -> int:
    """How many chunks the host's down copies hold, one rule for the worker and `aioffload plan`:
    every chunk the memory budget allows (copy_bytes_per_chunk: one chunk's down columns over every
    offloaded layer; None: no budget, as on a tensor-parallel follower, which runs rank 0's shares).

    Not the calibrated shares with headroom: after a calibration taken while the host was busy,
    the same host's steps ran at half the calibrated time, and the chooser, which learns that from
    the steps, stopped at the copies' cap of 53 chunks (1.25 x the largest calibrated share) where
    a quiet process had run 68-71 (BENCHMARKS.md, sixth session, call 8)."""
    if budget_bytes is None or copy_bytes_per_chunk <= 0:
        return num_chunks
    return min(num_chunks, max(0, budget_bytes // copy_bytes_per_chunk))


@dataclass(frozen=True)
class DownCopies:
    """What the host's down copies of a split hold on this machine (the worker and `aioffload plan`)."""

    chunks: int  # chunks of every offloaded layer's down columns copied (the most a host share may have)
    bytes_per_chunk: int  # one chunk's down columns over every offloaded layer
    available_bytes: int | None  # the host memory available when it was decided (None: unknown)

    @property
    def nbytes(self) -> int:
        return self.chunks * self.bytes_per_chunk


def plan_down_copies(split: SplitLayout, elem: int, num_offloaded: int, follower: bool = False) -> DownCopies:
    """The down copies for `num_offloaded` split layers: every chunk within the budget of this
    host's memory; a tensor-parallel follower (which runs rank 0's shares) has no budget."""
    per_chunk = num_offloaded * split.chunk * split.hidden * elem
    avail = host_memory_available()
    budget = None if follower else down_copy_budget(avail, num_offloaded * split.numel * elem)
    return DownCopies(host_copy_chunks(split.num_chunks, per_chunk, budget), per_chunk, avail)


def format_table(model: SplitCostModel, batch_sizes: Sequence[int], num_layers: int) -> str:
    """The chosen split per batch size, one line each (start-up log, `aioffload plan`)."""
    lines = [
        f"host share per offloaded layer ({model.host.threads} host threads, {model.num_chunks} chunks of "
        f"{model.chunk_bytes / 1e6:.2f} MB, {model.h2d_bytes_per_s / 1e9:.1f} GB/s host->GPU):"
    ]
    for r in model.table(batch_sizes):
        step = r["layer_ms"] * num_layers
        t = int(r["tokens"])
        rate = model.chunk_bytes / max(model.host.seconds(t, 1) - model.host.seconds(t, 0), 1e-12) / 1e9
        lines.append(
            f"  batch {int(r['tokens']):>4}: host reads {rate:5.1f} GB/s; host {int(r['host_chunks']):>3}/"
            f"{model.num_chunks} chunks "
            f"({r['host_share']:.0%}), {r['layer_ms']:.2f} ms/layer vs {r['stream_ms']:.2f} streamed "
            f"-> {step:.1f} ms for {num_layers} layers ({r['layer_ms'] / r['stream_ms']:.2f}x the copy floor)"
        )
    return "\n".join(lines)
