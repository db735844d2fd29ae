"""`aioffload plan`: the placement plan from headers alone, without loading weights."""

from __future__ import annotations

import torch

from aioffload.config import ConfigError, EngineConfig
from aioffload.placement import estimate_activation_bytes, format_plan, plan_placement
from aioffload.weights import Checkpoint
from aioffload.worker import resolve_max_model_len


def run_plan(config: EngineConfig) -> int:
    ckpt = Checkpoint.open(config.model)
    mcfg = ckpt.model_config
    gb = config.offload.gpu_memory_gb
    if gb is not None:
        total = int(gb * 1e9)
    elif torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
    else:
        raise ConfigError("no CUDA device here: pass --gpu-memory-gb to plan for a card of that size")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = ckpt.resolve_dtype(config.dtype, device if config.dtype != "auto" else torch.device("cuda"))
    elem = torch.empty((), dtype=dtype).element_size()
    h2d = (config.offload.h2d_gbps or 25.0) * 1e9
    max_len = resolve_max_model_len(config, ckpt)
    sched = config.scheduler
    placement = plan_placement(
        mcfg, elem, config.offload, config.cache, sched, max_len, total, h2d,
        estimate_activation_bytes(mcfg, elem, sched.max_num_batched_tokens, sched.max_num_seqs),
    )  # fmt: skip
    print(f"model {ckpt.path} ({mcfg.architecture}, {mcfg.num_layers} layers, {str(dtype).removeprefix('torch.')})")
    print(f"device memory {total / 1e9:.1f} GB, host-to-device {h2d / 1e9:.1f} GB/s, max-model-len {max_len}")
    print(format_plan(placement, mcfg, config.cache.block_size))
    return 0
