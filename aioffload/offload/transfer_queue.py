"""Streams offloaded layers' weights host -> GPU through a ring of staging slots.

DESIGN.md section 4. Offloaded layers are loaded in forward order, forever: load j
brings layer `order[j % O]` into slot `j % K`. Per slot, `loaded` (copy done; compute
may read) and `freed` (compute done; the copy may overwrite). Compute waits on
`loaded`, the copy stream waits on `freed`; the host never synchronises. Releasing a
slot immediately queues the load K ahead, so after the last offloaded layer of step n
the first ones of step n+1 are already in flight. On the CPU the copies run inline.

With a split layout (offload/split_layout.py) each load copies only the GPU share of the
layer: `set_split(k)` says how many chunks the host computes in this step and in the loads
issued from now on. A slot remembers the share it was loaded with; when a step needs more
on the GPU than a prefetched slot holds (a big prefill after small decodes), the missing
chunks are topped up on the copy stream before the layer computes.

The queue knows nothing of requests; it only hands out layer weights (a LayerSource).
"""

from __future__ import annotations

import logging

import torch

from aioffload.model.layout import LayerLayout, LayerWeights
from aioffload.offload.split_layout import SplitLayout, SplitWeights

log = logging.getLogger("aioffload.transfer_queue")


class ResidentLayers:
    """LayerSource when every layer lives on the device."""

    def __init__(self, resident: dict[int, LayerWeights]) -> None:
        self.resident = resident

    def acquire(self, layer: int) -> LayerWeights:
        return self.resident[layer]

    def release(self, layer: int) -> None:
        pass


class TransferQueue:
    """LayerSource for a model with offloaded layers (a ring of `ring_size` staging slots)."""

    def __init__(
        self,
        resident: dict[int, LayerWeights],
        host: dict[int, torch.Tensor],  # layer -> flat (pinned) host buffer
        layout: LayerLayout,
        device: torch.device,
        ring_size: int = 2,
        split: SplitLayout | None = None,  # host buffers are in this layout: loads copy the GPU share only
    ) -> None:
        assert host, "TransferQueue needs at least one offloaded layer"
        self.resident = resident
        self.host = host
        self.order = sorted(host)  # offloaded layers in forward order
        self.ring_size = max(1, min(ring_size, len(self.order)))
        self.split = split
        dtype = next(iter(host.values())).dtype
        numel = split.numel if split is not None else layout.numel
        self.slots = [torch.empty(numel, dtype=dtype, device=device) for _ in range(self.ring_size)]
        self.views = [LayerWeights(s, layout) for s in self.slots] if split is None else []
        self.load_k = 0  # host chunks of the loads issued from now on
        self.step_k = 0  # host chunks of the step being computed
        self.slot_k = [0] * self.ring_size  # host chunks each slot was loaded with
        self._split_views: dict[tuple[int, int, int], SplitWeights] = {}
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.loaded = [torch.cuda.Event() for _ in self.slots]
            self.freed = [torch.cuda.Event() for _ in self.slots]
        self.bytes_per_step = sum(h.numel() * h.element_size() for h in host.values())
        self._prime(0)

    def _prime(self, first: int) -> None:
        # Load counters: load j brings layer order[j % O] into slot j % K.
        self._next_load = first
        self._next_use = first  # the load compute consumes next
        if self.cuda:
            for e in self.freed:
                e.record(torch.cuda.current_stream())
        for _ in range(self.ring_size):
            self._enqueue()

    def reset(self, next_layer: int | None = None) -> None:
        """Re-prime so that `next_layer` (default: the first offloaded one) loads next.
        Only needed after an interrupted forward pass."""
        if self.cuda:
            torch.cuda.synchronize()
        self._prime(self.order.index(next_layer) if next_layer is not None else 0)

    def set_split(self, k: int) -> None:
        """This step's host share (chunks), also used by the loads issued from now on."""
        assert self.split is not None and 0 <= k <= self.split.num_chunks, f"host share {k} of {self.split}"
        self.step_k = self.load_k = k

    def _copy(self, slot: int, layer: int, ranges: list[tuple[int, int]]) -> None:
        dst, src = self.slots[slot], self.host[layer]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[slot])
                for lo, hi in ranges:
                    dst[lo:hi].copy_(src[lo:hi], non_blocking=True)
                self.loaded[slot].record(self.copy_stream)
        else:
            for lo, hi in ranges:
                dst[lo:hi].copy_(src[lo:hi])

    def _enqueue(self) -> None:
        j = self._next_load
        slot, layer = j % self.ring_size, self.order[j % len(self.order)]
        if self.split is None:
            self._copy(slot, layer, [(0, self.slots[slot].numel())])
        else:
            self._copy(slot, layer, [self.split.streamed_range(self.load_k)])
            self.slot_k[slot] = self.load_k
        self._next_load += 1

    def acquire(self, layer: int) -> LayerWeights:
        if layer in self.resident:
            return self.resident[layer]
        expected = self.order[self._next_use % len(self.order)]
        if expected != layer:
            log.warning("transfer ring expected layer %d, got %d; re-priming", expected, layer)
            self.reset(layer)
        slot = self._next_use % self.ring_size
        if self.split is not None and self.slot_k[slot] > self.step_k:
            self._top_up(slot, layer, self.step_k)
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.loaded[slot])
        if self.split is None:
            return self.views[slot]
        key = (slot, layer, self.step_k)
        w = self._split_views.get(key)
        if w is None:
            w = self._split_views[key] = SplitWeights(self.slots[slot], self.split, self.step_k, self.host[layer])
        return w

    def _top_up(self, slot: int, layer: int, k: int) -> None:
        """Copy chunks [k, slot_k) of both MLP regions so the slot holds the share of k."""
        sp, have = self.split, self.slot_k[slot]
        assert sp is not None
        lo_gu, _ = sp.streamed_range(have)
        start_gu, _ = sp.streamed_range(k)
        _, hi_dn = sp.streamed_range(k)
        _, start_dn = sp.streamed_range(have)
        self._copy(slot, layer, [(start_gu, lo_gu), (start_dn, hi_dn)])
        self.slot_k[slot] = k

    def release(self, layer: int) -> None:
        if layer in self.resident:
            return
        slot = self._next_use % self.ring_size
        if self.cuda:
            self.freed[slot].record(torch.cuda.current_stream())
        self._next_use += 1
        self._enqueue()
