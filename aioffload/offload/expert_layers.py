"""The layer sources of an MoE model: every layer's non-expert buffer resident (expert_placement.py),
routed experts from `ResidentExperts` (all on the device) or the expert stream (some on the host)."""

from __future__ import annotations

import torch

from aioffload.model.layout import ExpertWeights, LayerLayout, LayerWeights
from aioffload.offload.expert_stream import ExpertStream
from aioffload.offload.transfer_queue import ResidentLayers


class ResidentExperts:
    """ExpertSource when every routed expert lives on the device: layer -> [E, numel] stack."""

    def __init__(self, stacks: dict[int, torch.Tensor], layout: LayerLayout) -> None:
        self.views = {layer: ExpertWeights(t, layout) for layer, t in stacks.items()}

    def begin_step(self, num_tokens: int) -> None:
        pass

    def acquire(self, layer: int, counts: torch.Tensor) -> ExpertWeights:
        return self.views[layer]

    def release(self, layer: int) -> None:
        pass


class MoeLayers(ResidentLayers):
    """LayerSource of an MoE model: every layer's non-expert buffer is resident (expert_placement.py);
    the expert source rides along so the worker can tell whether experts stream and read its counters."""

    def __init__(
        self, resident: dict[int, LayerWeights], experts: ResidentExperts | ExpertStream, graph_safe: bool
    ) -> None:
        super().__init__(resident)
        self.experts = experts
        self.graph_safe = graph_safe  # no host sync in a resident forward (grouped GEMM on device offsets)

    @property
    def streams(self) -> bool:
        return isinstance(self.experts, ExpertStream)

    @property
    def bytes_per_step(self) -> int:
        return self.experts.bytes_per_step if isinstance(self.experts, ExpertStream) else 0

    def stats(self) -> dict[str, float]:
        return self.experts.stats() if isinstance(self.experts, ExpertStream) else {}
