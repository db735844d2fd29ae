"""The placement map: where every weight of the served model lives, as plain JSON-ready data.

Built once at start-up from the worker (its `Placement`, its weight tensors and its KV
cache) and served by the dashboard. Shape (every size in bytes):

    {"device": "cuda:0", "dtype": "bfloat16", "num_layers": 32, "offload_active": true,
     "embed":   {"place": "gpu" | "host", "bytes": ...},
     "lm_head": {"place": "gpu", "bytes": ..., "tied": false},
     "final_norm": {"place": "gpu", "bytes": ...},
     "layers": [{"index": 0, "place": "gpu" | "host" | "split", "bytes": ...,
                 "gpu_bytes": ..., "host_bytes": ...,
                 "host_share": 0.56,                     # "split", when the share is fixed
                 "experts": {"count": 64, "gpu": 8, "host": 56, "bytes_each": ...}},  # MoE only
                ...],
     "totals": {"gpu_weight_bytes", "host_weight_bytes", "ring_bytes", "activation_bytes",
                "device_total_bytes"},
     "kv": {"blocks", "block_size", "tokens", "bytes"},   # bytes: the K/V tensors (+ one trash block)
     "copy": {"bytes_per_step", "h2d_bytes_per_s", "floor_ms"},
     "trigger": 0.278, "reason": "...", "cuda_graphs": false}

"gpu" means resident on the compute device (the CPU on a CPU-only machine); "host" means
pinned host memory streamed every step; "split" a layer in host memory whose MLP the host
computes a share of while the rest streams (the hybrid split chooses that share per step:
it is the step record's `host_share`, not the cell's). A layer's `gpu_bytes + host_bytes == bytes`.
"""

from __future__ import annotations

from typing import Any

import torch

from aioffload.offload.placement import Placement
from aioffload.worker.worker import Worker


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _place(t: torch.Tensor, device: torch.device) -> str:
    return "gpu" if t.device == device else "host"


def layer_cells(p: Placement, num_layers: int, split: bool = False) -> list[dict[str, Any]]:
    """One cell per decoder layer, in forward order. With `split`, every offloaded layer is split
    between host and GPU; its share is chosen per step, so the cell carries none (the step
    record does)."""
    host = set(p.offloaded_layers)
    cells = []
    for i in range(num_layers):
        on_host = i in host
        cells.append({"index": i, "place": ("split" if split else "host") if on_host else "gpu",
                      "bytes": p.layer_bytes, "gpu_bytes": 0 if on_host else p.layer_bytes,
                      "host_bytes": p.layer_bytes if on_host else 0})
    return cells


def describe_placement(worker: Worker, split: bool = False) -> dict[str, Any]:
    """The placement map of `worker` (module docstring); `split`: the offloaded layers are split."""
    p, model, dev = worker.placement, worker.model, worker.device
    tied = model.lm_head is model.embed
    kv_bytes = sum(_nbytes(t) for t in worker.kv.k + worker.kv.v)
    return {
        "device": str(dev),
        "dtype": str(worker.dtype).removeprefix("torch."),
        "num_layers": worker.model_config.num_layers,
        "offload_active": worker.offload_active,
        "embed": {"place": _place(model.embed, dev), "bytes": _nbytes(model.embed)},
        "lm_head": {"place": _place(model.lm_head, dev), "bytes": 0 if tied else _nbytes(model.lm_head),
                    "tied": tied},
        "final_norm": {"place": _place(model.final_norm, dev), "bytes": _nbytes(model.final_norm)},
        "layers": layer_cells(p, worker.model_config.num_layers, split),
        "totals": {"gpu_weight_bytes": p.gpu_weight_bytes, "host_weight_bytes": p.host_weight_bytes,
                   "ring_bytes": p.ring_bytes, "activation_bytes": p.activation_bytes,
                   "device_total_bytes": p.device_total_bytes},
        "kv": {"blocks": worker.num_blocks, "block_size": worker.block_size,
               "tokens": worker.num_blocks * worker.block_size, "bytes": kv_bytes},
        "copy": {"bytes_per_step": worker.offload_bytes_per_step, "h2d_bytes_per_s": worker.h2d_bytes_per_s,
                 "floor_ms": worker.copy_floor_s * 1e3},
        "trigger": p.trigger,
        "reason": p.reason,
        "cuda_graphs": worker.graphs is not None,
    }
