"""One rank's model under tensor parallelism: its shard of every weight, read from the checkpoint's
slices straight into its final place (DESIGN.md section 10), beside model_loader's whole-model path.

The rank's layers use the standard layout (model/layout.py) of its own ModelConfig (sharding's
`local_model_config`), so placement, the transfer queue, the host/GPU split and the KV cache work
on the shard exactly as they do on a whole model.
"""

from __future__ import annotations

import logging
import time

import torch

from aioffload.attention.backends import AttentionBackend
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.checkpoint.shard_read import read_layer_shard_into, read_shard_into
from aioffload.config import ModelConfig
from aioffload.distributed.parallel_ops import ShardOps
from aioffload.model.layout import LayerWeights, layer_layout
from aioffload.model.llama import LayerSource, LlamaModel
from aioffload.offload.pinned import pinned_empty
from aioffload.offload.split_layout import SplitLayout, fill_mlp
from aioffload.offload.split_mlp import HostCompute
from aioffload.worker.model_loader import LoadedWeights, assemble

log = logging.getLogger("aioffload.weights")


def build_sharded_model(
    ckpt: Checkpoint,
    local: ModelConfig,
    parallel: ShardOps,
    dtype: torch.dtype,
    device: torch.device,
    attention: AttentionBackend,
    max_positions: int,
    offloaded: frozenset[int] = frozenset(),
    embed_on_host: bool = False,
    ring_size: int = 2,
    split: SplitLayout | None = None,
    host_compute: HostCompute | None = None,
) -> tuple[LlamaModel, LayerSource]:
    """build_model for one rank: `local` is its share of the model, `parallel` its group."""
    w = load_shard_weights(ckpt, local, parallel, dtype, device, offloaded, embed_on_host,
                           split if offloaded else None)  # fmt: skip
    return assemble(w, local, device, attention, max_positions, ring_size, split, host_compute, parallel)


def load_shard_weights(
    ckpt: Checkpoint,
    local: ModelConfig,
    parallel: ShardOps,
    dtype: torch.dtype,
    device: torch.device,
    offloaded: frozenset[int] = frozenset(),
    embed_on_host: bool = False,
    split: SplitLayout | None = None,
) -> LoadedWeights:
    """load_weights for one rank: every tensor's rank slice, read once into its final place."""
    shard, layout = parallel.shard, layer_layout(local)
    pin = device.type == "cuda"
    t0 = time.perf_counter()

    def host_buffer(numel: int) -> torch.Tensor:
        return pinned_empty(numel, dtype) if pin else torch.empty(numel, dtype=dtype)

    def load(name: str, shape: tuple[int, ...], dev: torch.device) -> torch.Tensor:
        host = torch.zeros(shape, dtype=dtype)  # vocabulary rows past the real ones stay zero
        read_shard_into(ckpt.entries[name], name, host.view(-1), shard)
        return host.to(dev)

    vocab = (local.vocab_size, local.hidden_size)  # this rank's padded rows
    embed = load("model.embed_tokens.weight", vocab, torch.device("cpu") if embed_on_host else device)
    final_norm = load("model.norm.weight", (local.hidden_size,), device)
    if "lm_head.weight" in ckpt.entries:
        lm_head = load("lm_head.weight", vocab, device)
    else:  # tied: lm_head's rows are the embedding's, and the shard is the same slice
        lm_head = embed if embed.device == device else embed.to(device)
    staging = host_buffer(layout.numel) if pin and len(offloaded) < local.num_layers else None
    resident: dict[int, LayerWeights] = {}
    host: dict[int, torch.Tensor] = {}
    for i in range(local.num_layers):
        if i in offloaded and split is not None:
            flat = host_buffer(split.numel)
            read_layer_shard_into(ckpt, i, flat, split.attn, shard)
            mlp = {}
            for name in ("gate", "up", "down"):
                full = f"model.layers.{i}.mlp.{name}_proj.weight"
                shape = (local.hidden_size, local.intermediate_size) if name == "down" else (
                    local.intermediate_size, local.hidden_size)  # fmt: skip
                mlp[name] = torch.empty(shape, dtype=dtype)
                read_shard_into(ckpt.entries[full], full, mlp[name].view(-1), shard)
            fill_mlp(split, flat, mlp["gate"], mlp["up"], mlp["down"])
        else:
            flat = host_buffer(layout.numel) if i in offloaded or staging is None else staging
            read_layer_shard_into(ckpt, i, flat, layout, shard)
        if i in offloaded:
            host[i] = flat
        else:
            resident[i] = LayerWeights(flat.to(device) if flat.device != device else flat, layout)
    log.info(
        "loaded rank %d of %d of %s: %d layers (%d resident, %d offloaded), %.1f GB in %.1f s",
        shard.rank, shard.size, ckpt.path.name, local.num_layers, len(resident), len(host),
        (local.num_layers * layout.nbytes(dtype) + 2 * embed.numel() * dtype.itemsize) / 1e9, time.perf_counter() - t0,
    )  # fmt: skip
    return LoadedWeights(layout, embed, final_norm, lm_head, resident, host)
