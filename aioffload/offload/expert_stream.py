"""Routed-expert streaming: offloaded experts reach the GPU per layer, per step (DESIGN.md section 9).

Each streamed MoE layer computes from a staging slot [E, numel] whose row e is expert e,
so its grouped GEMM is the one a resident layer runs. Slots form a ring (load g -> slot
g % K, streamed layers in forward order, across steps) with `loaded` / `freed` events
per slot, as the dense transfer queue's. Per layer and step one of two loads fills it:

- routed: after the router, the per-expert token counts go to a small pinned buffer; the
  host waits on an event (blocking, never spinning), then copies exactly the union of the
  routed experts: those not in the GPU expert cache host to device first (runs of
  consecutive ids in one copy), then resident ones (a split layer) and cached ones device
  to device; the newly copied ones are then offered to the cache;
- full: the layer's whole offloaded set, queued ahead like the dense ring (no wait on the
  router); cached experts are copied from the cache instead of the host.

`begin_step` picks the mode per layer from the step's token count (expert_modes.py), and
detects an interrupted forward (a failed step) and re-primes. On the CPU the copies run
inline, so CI checks bit-identity with resident experts. The stream knows nothing of
requests.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from aioffload.model.layout import ExpertWeights, LayerLayout
from aioffload.offload.expert_cache import ExpertCache
from aioffload.offload.expert_modes import ROUTED_BUBBLE_S, UnionModel, choose_full
from aioffload.offload.pinned import pinned_empty
from aioffload.offload.placement import HBM_BYTES_PER_S

log = logging.getLogger("aioffload.expert_stream")


@dataclass
class StepCounters:
    copied_bytes: int = 0  # expert bytes copied host -> device (issued during the step)
    routed_bytes: int = 0  # bytes of the routed experts that live on the host (what routing needs)
    full_layers: int = 0  # layers streamed as a whole expert set
    routed_layers: int = 0  # layers streamed as the routed union


class ExpertStream:
    """ExpertSource for an MoE model with offloaded experts. `resident`: MoE layer -> [n, numel]
    device stack of experts 0..n-1 (n = E: fully resident); `host`: streamed layer -> [E - n, numel]
    (pinned) host rows of experts n..E-1."""

    def __init__(
        self,
        resident: dict[int, torch.Tensor],
        host: dict[int, torch.Tensor],
        layout: LayerLayout,
        num_experts: int,
        top_k: int,
        device: torch.device,
        staging_slots: int = 2,
        cache_experts: int = 0,
        mode: str = "auto",
        h2d_bytes_per_s: float = 25e9,
    ) -> None:
        assert host, "ExpertStream needs at least one layer with offloaded experts"
        e = num_experts
        self.resident, self.host, self.num_experts, self.mode = resident, host, e, mode
        self.order = sorted(host)  # streamed layers, forward order
        self.pos_of = {layer: j for j, layer in enumerate(self.order)}
        self.num_resident = {layer: resident[layer].shape[0] if layer in resident else 0 for layer in self.order}
        self.resident_views = {i: ExpertWeights(t, layout) for i, t in resident.items() if i not in host}
        dtype = next(iter(host.values())).dtype
        self.expert_bytes = layout.numel * dtype.itemsize
        self.bytes_per_step = sum(h.numel() for h in host.values()) * dtype.itemsize  # the copy-everything bytes
        self.ring = max(1, min(staging_slots, len(self.order)))
        self.slots = [torch.empty(e, layout.numel, dtype=dtype, device=device) for _ in range(self.ring)]
        self.views = [ExpertWeights(s, layout) for s in self.slots]
        self.cache = ExpertCache(cache_experts)
        self.cache_buf = torch.empty(cache_experts, layout.numel, dtype=dtype, device=device)
        # Per-expert row views, made once: slicing a tensor per copy costs more host time than the copy call.
        self.slot_rows = [list(s.unbind(0)) for s in self.slots]
        self.cache_rows = list(self.cache_buf.unbind(0))
        self.host_rows = {layer: list(h.unbind(0)) for layer, h in host.items()}
        self.resident_rows = {layer: list(t.unbind(0)) for layer, t in resident.items() if layer in host}
        self.union = UnionModel(e, top_k)
        self.bubble_experts = ROUTED_BUBBLE_S * h2d_bytes_per_s / self.expert_bytes
        self.h2d_per_hbm = h2d_bytes_per_s / HBM_BYTES_PER_S
        self.cuda = device.type == "cuda"
        n = len(self.order)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.loaded = [torch.cuda.Event() for _ in self.slots]
            self.freed = [torch.cuda.Event() for _ in self.slots]
            self.counts_ready = torch.cuda.Event(blocking=True)  # the host sleeps on it, never spins
            self.counts_host = pinned_empty(n * e, torch.int32).view(n, e)
        else:
            self.counts_host = torch.zeros(n, e, dtype=torch.int32)
        self.full = [mode == "full"] * n  # this step's plan, per streamed layer
        self.tokens = 0
        self.step = StepCounters()
        self.last = StepCounters()  # the last finished step
        self.total = StepCounters()  # every finished step
        self._pending: list[int] = []  # streamed layers whose counts were copied without a wait
        self._reset()

    # ---- ring state ----

    def _reset(self, first: int = 0) -> None:
        """Re-prime after an interrupted forward: nothing in flight, `first` (position) loads next."""
        if self.cuda:
            torch.cuda.synchronize()
            for ev in self.freed:
                ev.record(torch.cuda.current_stream())
        self._used = self._loaded = first  # loads < _loaded are issued; load g -> slot g % ring
        self._acquired: int | None = None
        self._pending.clear()
        self._top_up()

    def _top_up(self) -> None:
        """Queue whole-set loads ahead while ring slots allow, stopping at the first routed layer
        (its copies wait for its router, and the copy stream keeps forward order)."""
        n = len(self.order)
        while self._loaded < self._used + self.ring and self.full[self._loaded % n]:
            self._load_full(self._loaded)
            self._loaded += 1

    # ---- ExpertSource ----

    def begin_step(self, num_tokens: int) -> None:
        if self._acquired is not None or self._used % len(self.order):
            log.warning("expert stream: the last step did not finish; re-priming")
            self._reset()
        self.end_step()
        self.tokens = num_tokens
        if self.mode == "auto":
            for j, layer in enumerate(self.order):
                off = self.num_experts - self.num_resident[layer]
                u = self.union.predict(layer, num_tokens)
                cached = self.cache.cached_in_layer(layer)
                self.full[j] = choose_full(u, self.num_experts, off, cached, self.bubble_experts, self.h2d_per_hbm)
        self._top_up()

    def acquire(self, layer: int, counts: torch.Tensor) -> ExpertWeights:  # counts: [E] int32
        j = self.pos_of.get(layer)
        if j is None:
            return self.resident_views[layer]
        if self._used % len(self.order) != j:
            log.warning(
                "expert stream expected layer %d, got %d; re-priming", self.order[self._used % len(self.order)], layer
            )
            self._reset(j)
        g = self._used
        self._acquired = g
        if g < self._loaded:  # the whole set is on its way; note the union without waiting
            self._copy_counts(j, counts, wait=False)
            self.step.full_layers += 1
        else:
            self._load_routed(g, self._copy_counts(j, counts, wait=True))
            self._loaded = g + 1
            self.step.routed_layers += 1
            self._top_up()
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.loaded[g % self.ring])
        return self.views[g % self.ring]

    def release(self, layer: int) -> None:
        if layer not in self.pos_of:
            return
        if self.cuda:
            self.freed[self._used % self.ring].record(torch.cuda.current_stream())
        self._used += 1
        self._acquired = None
        self._top_up()

    def end_step(self) -> None:
        """Account the finished step (read the unions of whole-set layers) and start new counters.
        Call only when the step's device work is done (its logits were read); begin_step does."""
        for j in self._pending:
            self._observe(j, self.counts_host[j].nonzero().flatten().tolist())
        self._pending.clear()
        self.last, self.step = self.step, StepCounters()
        for f in dataclasses.fields(StepCounters):
            setattr(self.total, f.name, getattr(self.total, f.name) + getattr(self.last, f.name))

    def stats(self) -> dict[str, float]:
        return {
            "expert_cache_hit_rate": self.cache.hit_rate,
            "expert_copy_bytes_per_step": self.last.copied_bytes,
            "expert_routed_bytes_per_step": self.last.routed_bytes,
            "expert_full_layers_per_step": self.last.full_layers,
        }

    # ---- loads ----

    def _copy_counts(self, j: int, counts: torch.Tensor, wait: bool) -> list[int]:
        """Counts to the pinned row of streamed layer j; with `wait`, the routed experts (sorted ids)."""
        self.counts_host[j].copy_(counts, non_blocking=self.cuda)
        if self.cuda and not wait:
            self._pending.append(j)  # read by end_step, once the step is done
            return []
        if self.cuda:
            self.counts_ready.record(torch.cuda.current_stream())
            self.counts_ready.synchronize()
        union = self.counts_host[j].nonzero().flatten().tolist()
        self._observe(j, union)
        return union

    def _observe(self, j: int, union: list[int]) -> None:
        layer = self.order[j]
        self.union.observe(layer, self.tokens, len(union))
        on_host = len(union) - bisect.bisect_left(union, self.num_resident[layer])
        self.step.routed_bytes += on_host * self.expert_bytes

    def _begin_copies(self, slot: int) -> None:
        """Copies into `slot` go on the copy stream, after its last reader (`freed`)."""
        if self.cuda:
            self._stream_ctx = torch.cuda.stream(self.copy_stream)
            self._stream_ctx.__enter__()
            self.copy_stream.wait_event(self.freed[slot])

    def _end_copies(self, slot: int) -> None:
        if self.cuda:
            self.loaded[slot].record(self.copy_stream)
            self._stream_ctx.__exit__(None, None, None)

    def _load_routed(self, g: int, experts: list[int]) -> None:
        """The routed experts into the layer's slot: host-to-device first (the long copies; runs of
        consecutive ids in one), then resident (a split layer) and cached ones device to device; then
        the newly copied experts are offered to the cache."""
        layer = self.order[g % len(self.order)]
        slot = g % self.ring
        r, rows, host_rows = self.num_resident[layer], self.slot_rows[slot], self.host_rows[layer]
        cache = self.cache
        hits, misses = [], []
        for e in experts:
            if e >= r:
                c = cache.lookup((layer, e)) if cache.capacity else None
                if c is None:
                    misses.append(e)
                else:
                    hits.append((e, c))
        self._begin_copies(slot)
        for a, b in _runs(misses):
            if b - a == 1:
                rows[a].copy_(host_rows[a - r], non_blocking=True)
            else:
                self.slots[slot][a:b].copy_(self.host[layer][a - r : b - r], non_blocking=True)
            self.step.copied_bytes += (b - a) * self.expert_bytes
        for e in experts:
            if e >= r:
                break
            rows[e].copy_(self.resident_rows[layer][e])
        for e, c in hits:
            rows[e].copy_(self.cache_rows[c])
        if cache.capacity:
            pinned = {(layer, e) for e in experts if e >= r}
            for e in misses:
                c = cache.insert((layer, e), pinned)
                if c is not None:
                    self.cache_rows[c].copy_(rows[e])
        self._end_copies(slot)

    def _load_full(self, g: int) -> None:
        """The layer's whole expert set into its slot, cached experts from the cache."""
        layer = self.order[g % len(self.order)]
        slot = g % self.ring
        r, dst, host = self.num_resident[layer], self.slots[slot], self.host[layer]
        cached = [(e, c) for e in range(r, self.num_experts) if (c := self.cache.peek((layer, e))) is not None]
        in_cache = {e for e, _ in cached}
        self._begin_copies(slot)
        if r:
            dst[:r].copy_(self.resident[layer])
        for a, b in _runs([e for e in range(r, self.num_experts) if e not in in_cache]):
            dst[a:b].copy_(host[a - r : b - r], non_blocking=True)
            self.step.copied_bytes += (b - a) * self.expert_bytes
        for e, c in cached:
            self.slot_rows[slot][e].copy_(self.cache_rows[c])
        self._end_copies(slot)


def _runs(ids: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted ids -> maximal [a, b) ranges of consecutive ids: one copy per range."""
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        yield ids[i], ids[j - 1] + 1
        i = j
