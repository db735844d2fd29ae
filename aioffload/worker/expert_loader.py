"""Assemble a mixture-of-experts model: non-expert weights resident, routed experts where the
expert placement put them (DESIGN.md section 9).

Every layer's non-expert buffer (attention, norms, router, shared expert, or a dense MLP)
is loaded by `load_weights` onto the device. Routed experts are read straight from the
safetensors files into their final place, one expert at a time: resident ones through a
reused pinned staging buffer into a per-layer [n, numel] device stack, offloaded ones
into the rows of a per-layer pinned host buffer [E - n, numel] (each expert's row is its
gate | up | down, contiguous), so peak host memory stays near the offloaded bytes.
"""

from __future__ import annotations

import logging
import time

import torch

from aioffload.attention.backends import AttentionBackend
from aioffload.checkpoint.checkpoint import Checkpoint, read_expert_into
from aioffload.model.layout import expert_layout
from aioffload.model.llama import LayerSource, LlamaModel
from aioffload.model.moe import MoeMlp, grouped_mm_works
from aioffload.offload.expert_layers import MoeLayers, ResidentExperts
from aioffload.offload.expert_placement import ExpertPlan
from aioffload.offload.expert_stream import ExpertStream
from aioffload.offload.pinned import pinned_empty
from aioffload.progress import Progress
from aioffload.worker.model_loader import load_weights

log = logging.getLogger("aioffload.weights")


def build_moe_model(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    attention: AttentionBackend,
    max_positions: int,
    plan: ExpertPlan | None = None,
    embed_on_host: bool = False,
) -> tuple[LlamaModel, LayerSource]:
    """`plan` None: every routed expert resident."""
    cfg = ckpt.model_config
    w = load_weights(ckpt, dtype, device, frozenset(), embed_on_host)
    split = dict(plan.resident) if plan is not None else {layer: cfg.num_experts for layer in cfg.moe_layers}
    resident, host = load_experts(ckpt, dtype, device, split)
    layout = expert_layout(cfg)
    grouped = grouped_mm_works(device, dtype, layout)
    experts: ResidentExperts | ExpertStream
    if host:
        assert plan is not None
        experts = ExpertStream(
            resident, host, layout, cfg.num_experts, cfg.num_experts_per_tok, device, plan.staging_slots,
            plan.cache_experts, plan.stream_mode, plan.h2d_bytes_per_s,
        )  # fmt: skip
    else:
        experts = ResidentExperts(resident, layout)
    layers = MoeLayers(w.resident, experts, graph_safe=grouped and not host)
    model = LlamaModel(cfg, w.embed, w.final_norm, w.lm_head, layers, attention, max_positions, device)
    # The MLP needs the decoder's choice of elementwise ops (fused on CUDA), made in its constructor.
    model.mlp = MoeMlp(cfg, model.ops, experts, grouped)
    log.info(
        "experts: %d MoE layers x %d experts, top-%d; %d streamed layers, grouped GEMM %s",
        len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok, len(host),
        "torch._grouped_mm" if grouped else "off (a loop of matmuls)",
    )  # fmt: skip
    return model, layers


def load_experts(
    ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, resident_count: dict[int, int]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(layer -> [n, numel] device stack of experts 0..n-1, layer -> [E - n, numel] host rows of
    experts n..E-1) for n = resident_count[layer]; host rows are pinned on CUDA."""
    cfg = ckpt.model_config
    e, numel = cfg.num_experts, expert_layout(cfg).numel
    pin = device.type == "cuda"
    progress = Progress("loading experts", len(resident_count) * e * numel * dtype.itemsize, 1e9, "GB")
    t0 = time.perf_counter()
    most = max(resident_count.values(), default=0)
    staging = pinned_empty(most * numel, dtype).view(most, numel) if pin and most else None
    resident: dict[int, torch.Tensor] = {}
    host: dict[int, torch.Tensor] = {}
    for layer, n in resident_count.items():
        if n:
            rows = staging[:n] if staging is not None else torch.empty(n, numel, dtype=dtype)
            for x in range(n):
                read_expert_into(ckpt, layer, x, rows[x])
            resident[layer] = rows.to(device) if pin else rows
        if n < e:
            rows = (
                pinned_empty((e - n) * numel, dtype).view(e - n, numel)
                if pin
                else torch.empty(e - n, numel, dtype=dtype)
            )
            for x in range(n, e):
                read_expert_into(ckpt, layer, x, rows[x - n])
            host[layer] = rows
        progress.advance(e * numel * dtype.itemsize)
    progress.close()
    off = sum(h.shape[0] for h in host.values())
    log.info(
        "loaded %d routed experts (%d resident, %d on the host, %.2f GB) in %.1f s",
        len(resident_count) * e, len(resident_count) * e - off, off, off * numel * dtype.itemsize / 1e9,
        time.perf_counter() - t0,
    )  # fmt: skip
    return resident, host
