"""Assemble a runnable LlamaModel from a checkpoint and a placement.

`load_weights` reads every tensor once into its final place: a device buffer for
resident layers, a pinned host buffer for offloaded ones (DESIGN.md section 3), so
peak host memory stays near the offloaded bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from aioffload.attention.backends import AttentionBackend
from aioffload.checkpoint.checkpoint import Checkpoint, read_layer_into
from aioffload.checkpoint.safetensors_io import read_into
from aioffload.config import ModelConfig
from aioffload.distributed.parallel_ops import ShardOps
from aioffload.model.layout import LayerLayout, LayerWeights, layer_layout
from aioffload.model.llama import LayerSource, LlamaModel
from aioffload.offload.expert_placement import ExpertPlan
from aioffload.offload.pinned import pinned_empty
from aioffload.offload.split_layout import SplitLayout, fill_mlp
from aioffload.offload.split_mlp import HostCompute, SplitMlp, host_down_copies
from aioffload.offload.transfer_queue import ResidentLayers, TransferQueue
from aioffload.progress import Progress

log = logging.getLogger("aioffload.weights")


def build_model(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    attention: AttentionBackend,
    max_positions: int,
    offloaded: frozenset[int] = frozenset(),
    embed_on_host: bool = False,
    ring_size: int = 2,
    split: SplitLayout | None = None,
    host_compute: HostCompute | None = None,
    experts: ExpertPlan | None = None,
) -> tuple[LlamaModel, LayerSource]:
    """The model over its weights. With `split` (and `host_compute`), offloaded layers are laid
    out for a host/GPU split of their MLP and computed by both sides (offload/split_mlp.py).
    `experts`: an MoE model's expert placement (None: every expert resident); MoE models keep
    every non-expert buffer resident, so `offloaded` and `split` apply to dense models only."""
    if ckpt.model_config.is_moe:
        from aioffload.worker.expert_loader import build_moe_model

        return build_moe_model(ckpt, dtype, device, attention, max_positions, experts, embed_on_host)
    w = load_weights(ckpt, dtype, device, offloaded, embed_on_host, split if offloaded else None)
    return assemble(w, ckpt.model_config, device, attention, max_positions, ring_size, split, host_compute)


def assemble(
    w: LoadedWeights,
    mcfg: ModelConfig,
    device: torch.device,
    attention: AttentionBackend,
    max_positions: int,
    ring_size: int,
    split: SplitLayout | None,
    host_compute: HostCompute | None,
    parallel: ShardOps | None = None,
) -> tuple[LlamaModel, LayerSource]:
    """The decoder over loaded weights: offloaded layers behind a transfer queue (split between host
    and GPU when `split`), resident ones handed out as they are; `parallel`: a tensor-parallel rank."""
    layers: LayerSource
    if w.host:
        layers = TransferQueue(w.resident, w.host, w.layout, device, ring_size, split)
    else:
        layers = ResidentLayers(w.resident)
    model = LlamaModel(mcfg, w.embed, w.final_norm, w.lm_head, layers, attention, max_positions, device,
                       parallel=parallel)  # fmt: skip
    if split is not None and w.host:
        assert host_compute is not None, "a split layout needs a HostCompute"
        k = split.num_chunks if host_compute.max_chunks is None else host_compute.max_chunks
        model.mlp = SplitMlp(model.mlp, host_compute, host_down_copies(w.host, split, k))
    return model, layers


@dataclass
class LoadedWeights:
    layout: LayerLayout
    embed: torch.Tensor  # [V, H], on the device, or on the host when embed_on_host
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    resident: dict[int, LayerWeights]  # layer -> views into a device buffer
    host: dict[int, torch.Tensor]  # layer -> flat pinned host buffer (offloaded layers)


def load_weights(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    offloaded: frozenset[int] = frozenset(),
    embed_on_host: bool = False,
    split: SplitLayout | None = None,
) -> LoadedWeights:
    """Read every tensor once into its final place. Offloaded layers go to pinned host memory
    (plain host memory on a CPU-only machine), in the split layout when `split` is given;
    everything else to `device`. An MoE model's routed experts are not read here
    (worker/expert_loader.py)."""
    cfg, layout = ckpt.model_config, ckpt.layout
    layouts = [layer_layout(cfg, i) for i in range(cfg.num_layers)]  # all equal unless the model is MoE
    pin = device.type == "cuda"
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(lay.numel for lay in layouts) * elem + 2 * cfg.vocab_size * cfg.hidden_size * elem
    progress = Progress("loading weights", total, unit_scale=1e9, unit="GB")
    t0 = time.perf_counter()

    def load(name: str, dev: torch.device) -> torch.Tensor:
        e = ckpt.entries[name]
        host = torch.empty(e.shape, dtype=dtype)
        read_into(e, host)
        progress.advance(host.numel() * elem)
        return host.to(dev)

    embed = load("model.embed_tokens.weight", torch.device("cpu") if embed_on_host else device)
    final_norm = load("model.norm.weight", device)
    if "lm_head.weight" in ckpt.entries:
        lm_head = load("lm_head.weight", device)
    else:
        lm_head = embed if embed.device == device else embed.to(device)

    def host_buffer(numel: int) -> torch.Tensor:
        return pinned_empty(numel, dtype) if pin else torch.empty(numel, dtype=dtype)

    # Resident layers pass through one reused pinned staging buffer on their way to the GPU.
    most = max(lay.numel for lay in layouts)
    staging = host_buffer(most) if pin and len(offloaded) < cfg.num_layers else None
    resident: dict[int, LayerWeights] = {}
    host: dict[int, torch.Tensor] = {}
    for i, lay in enumerate(layouts):
        offload = i in offloaded
        if offload and split is not None:
            flat = host_buffer(split.numel)
            _read_split_layer(ckpt, i, flat, split, dtype)
        else:
            flat = host_buffer(lay.numel) if offload or staging is None else staging[: lay.numel]
            read_layer_into(ckpt, i, flat, lay)
        if offload:
            host[i] = flat
        else:
            dev_flat = flat.to(device, non_blocking=False) if flat.device != device else flat
            resident[i] = LayerWeights(dev_flat, lay)
        progress.advance(lay.numel * elem)
    progress.close()
    log.info(
        "loaded %s: %d layers (%d resident, %d offloaded), %s, %.1f GB in %.1f s",
        ckpt.path.name, cfg.num_layers, len(resident), len(host), str(dtype).removeprefix("torch."),
        total / 1e9, time.perf_counter() - t0,
    )  # fmt: skip
    return LoadedWeights(layout, embed, final_norm, lm_head, resident, host)


def _read_split_layer(ckpt: Checkpoint, i: int, flat: torch.Tensor, split: SplitLayout, dtype: torch.dtype) -> None:
    """Layer i into `flat` in the split layout: attention weights straight from the file, the MLP
    matrices through one temporary each (down^T is a transpose of the stored matrix)."""
    read_layer_into(ckpt, i, flat, split.attn)
    mlp = {}
    for name in ("gate", "up", "down"):
        e = ckpt.entries[f"model.layers.{i}.mlp.{name}_proj.weight"]
        t = torch.empty(e.shape, dtype=dtype)
        read_into(e, t)
        mlp[name] = t
    fill_mlp(split, flat, mlp["gate"], mlp["up"], mlp["down"])
