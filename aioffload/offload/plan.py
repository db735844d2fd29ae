"""`aioffload plan`: the placement plan from the checkpoint's headers alone, without loading weights.

Under tensor parallelism the plan is one rank's: every rank holds the same share of every layer
(its heads, MLP units and vocabulary rows) and places it on its own GPU by the same rule, so one
plan stands for all of them; the ranks stream their shards over their own links at once.
"""

from __future__ import annotations

import torch

from aioffload.config import ConfigError, EngineConfig, ModelConfig
from aioffload.distributed.sharding import TPShard, local_model_config, rank_offload_config
from aioffload.offload.placement import estimate_activation_bytes, format_plan, plan_placement


def run_plan(config: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype, max_len: int, source: str) -> int:
    """Print the plan for `mcfg` (read from `source`) at `dtype` and `max_len` tokens per sequence;
    under --tensor-parallel-size N, the plan of each rank."""
    size = config.parallel.tensor_parallel_size
    full, mcfg = mcfg, local_model_config(mcfg, TPShard.of(mcfg, 0, size)) if size > 1 else mcfg
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
        mcfg, elem, rank_offload_config(config.offload, size), config.cache, sched, max_len, total, h2d,
        estimate_activation_bytes(mcfg, elem, sched.max_num_batched_tokens, sched.max_num_seqs),
    )  # fmt: skip
    print(f"model {source} ({mcfg.architecture}, {mcfg.num_layers} layers, {str(dtype).removeprefix('torch.')})")
    if size > 1:
        print(tensor_parallel_header(full, mcfg, size, placement.predicted_step_floor_s))
    print(f"device memory {total / 1e9:.1f} GB, host-to-device {h2d / 1e9:.1f} GB/s, max-model-len {max_len}")
    print(format_plan(placement, mcfg, config.cache.block_size))
    if placement.offload_active and config.offload.hybrid != "off":
        print(hybrid_report(config, mcfg, dtype, h2d, len(placement.offloaded_layers)))
    return 0


def tensor_parallel_header(full: ModelConfig, local: ModelConfig, size: int, floor_s: float) -> str:
    kv = "replicated: fewer KV heads than ranks" if full.num_kv_heads < size else "sharded"
    return (
        f"tensor parallel  {size} ranks, one GPU each; the plan below is each rank's: {local.num_heads} of "
        f"{full.num_heads} attention heads, {local.num_kv_heads} of {full.num_kv_heads} KV heads ({kv}), "
        f"{local.intermediate_size} of {full.intermediate_size} MLP units, {local.vocab_size} of {full.vocab_size} "
        f"vocabulary rows\n"
        + (f"per-rank floor   {floor_s * 1e3:.1f} ms per decode step: each rank streams its own shard over its "
           "own link, all at once" if floor_s else "per-rank floor   no offload on any rank")
        + " (--cpu-offload-gb counts all ranks together; the trigger and --gpu-memory-gb one GPU)"
    )


def hybrid_report(config: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype, h2d: float, num_offloaded: int) -> str:
    """The host/GPU split per batch size, from a calibration of this machine's host cores."""
    from aioffload.model.layout import layer_layout
    from aioffload.offload.calibrate import calibrate_host, default_host_threads
    from aioffload.offload.split_cost import SplitCostModel, format_table
    from aioffload.offload.split_layout import split_layout

    split = split_layout(layer_layout(mcfg), mcfg.hidden_size, mcfg.intermediate_size)
    rates = calibrate_host(split, dtype, config.offload.host_threads or default_host_threads())
    cost = SplitCostModel.for_layout(split, torch.empty((), dtype=dtype).element_size(), h2d, rates)
    head = f"hybrid {config.offload.hybrid}: host cores of this machine calibrated (no copy load during it)"
    return head + "\n" + format_table(cost, (1, 8, 64, 256), num_offloaded)
