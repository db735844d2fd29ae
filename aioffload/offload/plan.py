"""`aioffload plan`: the placement plan from the checkpoint's headers alone, without loading weights."""

from __future__ import annotations

import torch

from aioffload.config import ConfigError, EngineConfig, ModelConfig
from aioffload.offload.placement import estimate_activation_bytes, format_plan, plan_placement


def run_plan(config: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype, max_len: int, source: str) -> int:
    """Print the plan for `mcfg` (read from `source`) at `dtype` and `max_len` tokens per sequence."""
    gb = config.offload.gpu_memory_gb
    if gb is not None:
        total = int(gb * 1e9)
    elif torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
    else:
        raise ConfigError("no CUDA device here: pass --gpu-memory-gb to plan for a card of that size")
    elem = torch.empty((), dtype=dtype).element_size()
    h2d = (config.offload.h2d_gbps or 25.0) * 1e9
    sched = config.scheduler
    placement = plan_placement(
        mcfg, elem, config.offload, config.cache, sched, max_len, total, h2d,
        estimate_activation_bytes(mcfg, elem, sched.max_num_batched_tokens, sched.max_num_seqs),
    )  # fmt: skip
    print(f"model {source} ({mcfg.architecture}, {mcfg.num_layers} layers, {str(dtype).removeprefix('torch.')})")
    print(f"device memory {total / 1e9:.1f} GB, host-to-device {h2d / 1e9:.1f} GB/s, max-model-len {max_len}")
    print(format_plan(placement, mcfg, config.cache.block_size))
    return 0
