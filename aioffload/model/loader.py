"""Build a runnable LlamaModel from a checkpoint and a placement."""

from __future__ import annotations

import torch

from aioffload.attention import AttentionBackend
from aioffload.model.llama import LayerSource, LlamaModel
from aioffload.transfer_queue import ResidentLayers, TransferQueue
from aioffload.weights import Checkpoint, load_weights


def build_model(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    attention: AttentionBackend,
    max_positions: int,
    offloaded: frozenset[int] = frozenset(),
    embed_on_host: bool = False,
    ring_size: int = 2,
) -> tuple[LlamaModel, LayerSource]:
    w = load_weights(ckpt, dtype, device, offloaded, embed_on_host)
    layers: LayerSource
    if w.host:
        layers = TransferQueue(w.resident, w.host, w.layout, device, ring_size)
    else:
        layers = ResidentLayers(w.resident)
    model = LlamaModel(ckpt.model_config, w.embed, w.final_norm, w.lm_head, layers, attention, max_positions, device)
    return model, layers
