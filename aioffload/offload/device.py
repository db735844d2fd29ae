"""The device a worker runs on, and the figures its placement counts on.

One place for what the worker sizes memory with and `aioffload plan` prints, so the two
cannot disagree: the device, the memory that fractions count against, the host-to-device
bandwidth, and a fixed KV pool where one applies (`--num-kv-blocks`, or on the CPU the
blocks `--cpu-kv-cache-gb` holds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aioffload.attention.kv_cache import kv_bytes_per_block
from aioffload.config import ConfigError, EngineConfig, ModelConfig
from aioffload.offload.placement import Placement, plan_placement

CPU_H2D_BYTES_PER_S = 25e9  # assumed on the CPU: a "streamed" layer is a host memcpy, there is no link to measure
CPU_STAND_IN_BYTES = 1 << 40  # the CPU has no device memory: fractions count against 1 TiB (no limit in practice)


def pick_device(requested: str) -> torch.device:
    """--device auto | cpu | cuda; ConfigError for cuda without a CUDA device."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def measure_h2d_bytes_per_s(device: torch.device, nbytes: int = 256 << 20, trials: int = 5) -> float:
    """Pinned host -> device copy bandwidth: the fastest of `trials` timings of 4 copies each (events,
    after a warm-up copy). The fastest, since the copy floor is a bound: on the H200 single timings
    of one machine read 48.6 and 55.1 GB/s minutes apart, and the lower one had streaming steps
    beat their own floor by 8% (BENCHMARKS.md, seventh session, call 2)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    best = 0.0
    for _ in range(max(1, trials)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(4):
            dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = max(best, 4 * nbytes / (start.elapsed_time(end) / 1e3))
    return best


@dataclass(frozen=True)
class DeviceFacts:
    device: torch.device
    total_bytes: int  # what memory fractions count against
    total_source: str  # "card" | "--gpu-memory-gb" | "cpu" (the stand-in)
    h2d_bytes_per_s: float
    h2d_source: str  # "--h2d-gbps" | "measured" | "assumed"

    @property
    def on_cpu(self) -> bool:
        return self.device.type != "cuda"


def device_facts(config: EngineConfig, device: torch.device, measure_link: bool = True) -> DeviceFacts:
    """The device's memory and link as the worker uses them: the link is measured on CUDA (unless
    --h2d-gbps, or `measure_link=False` for a check that needs no speed) and assumed on the CPU."""
    gb, gbps = config.offload.gpu_memory_gb, config.offload.h2d_gbps
    if gb is not None:
        total, total_source = int(gb * 1e9), "--gpu-memory-gb"
    elif device.type == "cuda":
        total, total_source = torch.cuda.get_device_properties(device).total_memory, "card"
    else:
        total, total_source = CPU_STAND_IN_BYTES, "cpu"
    if gbps:
        h2d, h2d_source = gbps * 1e9, "--h2d-gbps"
    elif device.type == "cuda" and measure_link:
        h2d, h2d_source = measure_h2d_bytes_per_s(device), "measured"
    else:
        h2d, h2d_source = CPU_H2D_BYTES_PER_S, "assumed"
    return DeviceFacts(device, total, total_source, h2d, h2d_source)


def fixed_kv_blocks(config: EngineConfig, device: torch.device, block_bytes: int) -> int | None:
    """--num-kv-blocks, or on the CPU the blocks --cpu-kv-cache-gb holds; None: size from device memory."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type != "cuda":
        return int(cache.cpu_kv_cache_gb * 1e9 // block_bytes)
    return None


def kv_block_bytes(config: EngineConfig, mcfg: ModelConfig, dtype_bytes: int) -> int:
    return kv_bytes_per_block(mcfg.num_layers, config.cache.block_size, mcfg.num_kv_heads, mcfg.head_dim, dtype_bytes)


def place(
    config: EngineConfig, mcfg: ModelConfig, dtype_bytes: int, max_model_len: int, facts: DeviceFacts
) -> Placement:
    """The placement the worker loads and `aioffload plan` prints (ConfigError when it cannot work)."""
    fixed = fixed_kv_blocks(config, facts.device, kv_block_bytes(config, mcfg, dtype_bytes))
    return plan_placement(
        mcfg, dtype_bytes, config.offload, config.cache, config.scheduler, max_model_len, facts.total_bytes,
        facts.h2d_bytes_per_s, fixed_kv_blocks=fixed, predict_throughput=not facts.on_cpu,
    )  # fmt: skip
