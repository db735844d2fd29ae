"""Streams offloaded layers' weights host -> GPU through a ring of staging slots.

DESIGN.md section 4. Offloaded layers are loaded in forward order, forever: load j
brings layer `order[j % O]` into slot `j % K`. Per slot, `loaded` (copy done; compute
may read) and `freed` (compute done; the copy may overwrite). Compute waits on
`loaded`, the copy stream waits on `freed`; the host never synchronises. Releasing a
slot immediately queues the load K ahead, so after the last offloaded layer of step n
the first ones of step n+1 are already in flight. On the CPU the copies run inline.

The queue knows nothing of requests; it only hands out layer weights (a LayerSource).
"""

from __future__ import annotations

import logging

import torch

from aioffload.model.layout import LayerLayout, LayerWeights

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
    ) -> None:
        assert host, "TransferQueue needs at least one offloaded layer"
        self.resident = resident
        self.host = host
        self.order = sorted(host)  # offloaded layers in forward order
        self.ring_size = max(1, min(ring_size, len(self.order)))
        dtype = next(iter(host.values())).dtype
        self.slots = [torch.empty(layout.numel, dtype=dtype, device=device) for _ in range(self.ring_size)]
        self.views = [LayerWeights(s, layout) for s in self.slots]
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

    def _enqueue(self) -> None:
        j = self._next_load
        slot, layer = j % self.ring_size, self.order[j % len(self.order)]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[slot])
                self.slots[slot].copy_(self.host[layer], non_blocking=True)
                self.loaded[slot].record(self.copy_stream)
        else:
            self.slots[slot].copy_(self.host[layer])
        self._next_load += 1

    def acquire(self, layer: int) -> LayerWeights:
        if layer in self.resident:
            return self.resident[layer]
        expected = self.order[self._next_use % len(self.order)]
        if expected != layer:
            log.warning("transfer ring expected layer %d, got %d; re-priming", expected, layer)
            self.reset(layer)
        slot = self._next_use % self.ring_size
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.loaded[slot])
        return self.views[slot]

    def release(self, layer: int) -> None:
        if layer in self.resident:
            return
        slot = self._next_use % self.ring_size
        if self.cuda:
            self.freed[slot].record(torch.cuda.current_stream())
        self._next_use += 1
        self._enqueue()
