"""`aioffload plan`: the placement plan from the checkpoint's headers alone, without loading weights.

The plan is the one the worker would make on this machine (`device.place`, the same call):
on a GPU the card's memory and the measured link, on the CPU the assumed 25 GB/s and the KV
pool of --cpu-kv-cache-gb. The header says which figures are measured, given or assumed.

Under tensor parallelism the plan is one rank's: every rank holds the same share of every layer
(its heads, MLP units and vocabulary rows) and places it on its own GPU by the same rule, so one
plan stands for all of them; the ranks stream their shards over their own links at once.
"""

from __future__ import annotations

import dataclasses

import torch

from aioffload.config import EngineConfig, ModelConfig
from aioffload.distributed.sharding import TPShard, local_model_config, rank_offload_config
from aioffload.offload.device import DeviceFacts, device_facts, place
from aioffload.offload.placement import format_plan
from aioffload.offload.split_cost import hybrid_off_reason


def run_plan(config: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype, max_len: int, source: str,
             device: torch.device) -> int:  # fmt: skip
    """Print the plan for `mcfg` (read from `source`) at `dtype` and `max_len` tokens per sequence on
    `device`; under --tensor-parallel-size N, the plan of each rank."""
    size = config.parallel.tensor_parallel_size
    full = mcfg
    if size > 1:
        mcfg = local_model_config(mcfg, TPShard.of(mcfg, 0, size))
        config = config.replace(offload=rank_offload_config(config.offload, size))
    facts = device_facts(config, device)
    placement = place(config, mcfg, dtype.itemsize, max_len, facts)
    print(f"model {source} ({mcfg.architecture}, {mcfg.num_layers} layers, {_dtype_name(dtype)})")
    if size > 1:
        print(tensor_parallel_header(full, mcfg, size, placement.predicted_step_floor_s))
    for line in describe_device(config, mcfg, dtype, facts):
        print(line)
    print(f"max-model-len    {max_len}")
    stand_in = facts.total_source == "cpu"
    print(format_plan(placement, mcfg, config.cache.block_size, on_cpu=facts.on_cpu, stand_in=stand_in))
    if placement.offload_active and hybrid_off_reason(config.offload.hybrid, mcfg.is_moe, not facts.on_cpu) is None:
        print(hybrid_report(config, mcfg, dtype, facts.h2d_bytes_per_s, len(placement.offloaded_layers)))
    return 0


def describe_device(config: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype, facts: DeviceFacts) -> list[str]:
    """Where each device figure of the plan comes from, one line per figure."""
    total = f"{facts.total_bytes / 1e9:.1f} GB"
    if facts.on_cpu:
        lines = ["device           CPU (no CUDA device): weights and KV cache stay in host memory"]
        if facts.total_source == "cpu":
            lines.append(f"device memory    {total} stand-in: no limit on the CPU (--gpu-memory-gb N emulates a card)")
        else:
            lines.append(f"device memory    {total}: an emulated card (--gpu-memory-gb)")
    else:
        name = torch.cuda.get_device_name(facts.device)
        lines = [f"device           {name} ({facts.device})"]
        given = " (--gpu-memory-gb)" if facts.total_source == "--gpu-memory-gb" else ""
        lines.append(f"device memory    {total}{given}")
    h2d = f"{facts.h2d_bytes_per_s / 1e9:.1f} GB/s"
    why = {
        "--h2d-gbps": "given by --h2d-gbps",
        "measured": "measured, pinned copies",
        "assumed": "assumed: on the CPU a streamed layer is a host memcpy; --h2d-gbps to change",
    }[facts.h2d_source]
    lines.append(f"host-to-device   {h2d} ({why})")
    if config.cache.num_blocks is not None:
        lines.append(f"KV pool          fixed by --num-kv-blocks {config.cache.num_blocks}")
    elif facts.on_cpu:
        lines.append(f"KV pool          fixed by --cpu-kv-cache-gb {config.cache.cpu_kv_cache_gb:g} (as the CPU worker "
                     "sizes it; device memory only decides the placement)")  # fmt: skip
    if facts.on_cpu and config.dtype == "auto" and mcfg.checkpoint_dtype != _dtype_name(dtype):
        lines.append(f"dtype            {_dtype_name(dtype)}: auto on the CPU (the checkpoint is "
                     f"{mcfg.checkpoint_dtype}; --dtype {mcfg.checkpoint_dtype} plans its GPU size)")  # fmt: skip
    return lines


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    from aioffload.offload.split_cost import SplitCostModel, format_table, plan_down_copies
    from aioffload.offload.split_layout import split_layout

    split = split_layout(layer_layout(mcfg), mcfg.hidden_size, mcfg.intermediate_size)
    rates = calibrate_host(split, dtype, config.offload.host_threads or default_host_threads())
    elem = torch.empty((), dtype=dtype).element_size()
    copies = plan_down_copies(split, elem, num_offloaded)
    cost = dataclasses.replace(SplitCostModel.for_layout(split, elem, h2d, rates), max_host_chunks=copies.chunks)
    head = f"hybrid {config.offload.hybrid}: host cores of this machine calibrated (no copy load during it)"
    avail = copies.available_bytes
    memory = "unknown host memory" if avail is None else f"half of {avail / 1e9:.1f} GB available, less the pinned"
    tail = (f"host down copies: shares of at most {copies.chunks} of {split.num_chunks} chunks, "
            f"{copies.nbytes / 1e9:.2f} GB of host memory beside the pinned layers (every chunk that fits in {memory})")
    return head + "\n" + format_table(cost, (1, 8, 64, 256), num_offloaded) + "\n" + tail
