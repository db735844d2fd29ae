"""The device side of a step: inputs -> forward -> sampling. It never decides who runs.

At start-up the worker places the weights (offload/placement.py), loads them, sizes the KV
cache from the memory really left after a warm-up forward at the largest step, and
captures CUDA graphs when every weight is resident. Each decision is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from aioffload.attention.backends import select_backend
from aioffload.attention.kv_cache import KVCache, kv_bytes_per_block
from aioffload.checkpoint.checkpoint import Checkpoint, resolve_max_model_len
from aioffload.config import ConfigError, EngineConfig
from aioffload.offload.batching import offload_token_budget
from aioffload.offload.expert_layers import MoeLayers
from aioffload.offload.placement import Placement, estimate_activation_bytes, plan_placement
from aioffload.offload.transfer_queue import TransferQueue
from aioffload.worker.cuda_graphs import CudaGraphRunner
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.model_loader import build_model
from aioffload.worker.sampling import SamplingParams, sample_tokens

log = logging.getLogger("aioffload.worker")

# Dense matmul rate counted on when sizing offloaded steps: ~40% of an H100/H200's bf16
# peak (790 TFLOP/s measured), conservative because small-batch matmuls run below peak.
DENSE_FLOPS_COUNTED = 300e12


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def measure_h2d_bytes_per_s(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Pinned host -> device copy bandwidth, measured with events after a warm-up copy."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return 4 * nbytes / (start.elapsed_time(end) / 1e3)


class Worker:
    def __init__(self, config: EngineConfig, ckpt: Checkpoint) -> None:
        self.config = config
        self.device = pick_device(config.device)
        cuda = self.device.type == "cuda"
        self.dtype = ckpt.resolve_dtype(config.dtype, self.device)
        mcfg = ckpt.model_config
        self.model_config = mcfg
        self.max_model_len = resolve_max_model_len(config, ckpt)
        self.block_size = config.cache.block_size
        self.attention = select_backend(config.attention_backend, self.device)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.h2d_bytes_per_s = (
            config.offload.h2d_gbps * 1e9
            if config.offload.h2d_gbps
            else (measure_h2d_bytes_per_s(self.device) if cuda else 25e9)
        )
        total = self._device_total_bytes()
        sched = config.scheduler
        self.placement: Placement = plan_placement(
            mcfg, elem, config.offload, config.cache, sched, self.max_model_len, total, self.h2d_bytes_per_s,
            estimate_activation_bytes(mcfg, elem, sched.max_num_batched_tokens, sched.max_num_seqs),
        )  # fmt: skip
        log.info("placement: %s", self.placement.reason)
        self.model, self.layers = build_model(
            ckpt, self.dtype, self.device, self.attention, self.max_model_len,
            offloaded=frozenset(self.placement.offloaded_layers), embed_on_host=self.placement.embed_on_host,
            ring_size=config.offload.prefetch, experts=self.placement.experts,
        )  # fmt: skip
        streamed = isinstance(self.layers, TransferQueue | MoeLayers)  # MoeLayers: 0 bytes when experts are resident
        self.offload_bytes_per_step = self.layers.bytes_per_step if streamed else 0
        self.offload_active = self.offload_bytes_per_step > 0
        self.copy_floor_s = self.offload_bytes_per_step / self.h2d_bytes_per_s
        # Known before KV sizing, so the warm-up step profiles the largest step that will run.
        self.token_budget = sched.max_num_batched_tokens
        if self.offload_active:
            params = (self.placement.gpu_weight_bytes + self.placement.host_weight_bytes) // elem
            self.token_budget = offload_token_budget(
                sched.max_num_batched_tokens, self.copy_floor_s, params, DENSE_FLOPS_COUNTED if cuda else 0.0
            )
        self.num_blocks = self._size_kv_cache(total, elem)
        self.kv = KVCache(
            mcfg.num_layers, self.num_blocks, self.block_size, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device
        )
        block_bytes = kv_bytes_per_block(mcfg.num_layers, self.block_size, mcfg.num_kv_heads, mcfg.head_dim, elem)
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GB)",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size, self.num_blocks * block_bytes / 1e9,
        )  # fmt: skip
        self.graphs: CudaGraphRunner | None = None
        reason = self._graph_decision()
        if reason is None:
            t = time.perf_counter()
            self.graphs = CudaGraphRunner(
                self.model, self.kv, sched.max_num_seqs, -(-self.max_model_len // self.block_size)
            )
            log.info("CUDA graphs: on (every weight resident; captured in %.1f s)", time.perf_counter() - t)
        else:
            log.info("CUDA graphs: off (%s)", reason)

    def _device_total_bytes(self) -> int:
        gb = self.config.offload.gpu_memory_gb
        if gb is not None:
            return int(gb * 1e9)
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return 1 << 40  # CPU: memory fractions mean nothing unless --gpu-memory-gb emulates a card

    def _graph_decision(self) -> str | None:
        """None when graphs should be captured, else why not."""
        if self.device.type != "cuda":
            return "CPU device"
        if self.config.enforce_eager:
            return "--enforce-eager"
        if self.offload_active:
            return f"{len(self.placement.offloaded_layers)} layers offloaded: streamed eager path"
        if self.attention.name != "torch":
            return f"attention backend {self.attention.name} is not graph-safe"
        if isinstance(self.layers, MoeLayers) and not self.layers.graph_safe:
            return "MoE experts without torch._grouped_mm read their token counts on the host"
        return None

    def _size_kv_cache(self, total: int, elem: int) -> int:
        cfg, mcfg = self.config, self.model_config
        block_bytes = kv_bytes_per_block(mcfg.num_layers, self.block_size, mcfg.num_kv_heads, mcfg.head_dim, elem)
        need = -(-self.max_model_len // self.block_size)
        if cfg.cache.num_blocks is not None:
            blocks = cfg.cache.num_blocks
        elif self.device.type != "cuda":
            blocks = int(cfg.cache.cpu_kv_cache_gb * 1e9 // block_bytes)
        else:
            peak = self._profile_peak_bytes()
            budget = cfg.cache.gpu_memory_utilization * total - peak
            free_now = torch.cuda.mem_get_info(self.device)[0] - (256 << 20)
            blocks = int(min(budget, free_now) // block_bytes)
            log.info(
                "memory: %.2f GB in use at peak of a %d-token warm-up step; budget %.2f GB (%.0f%% of %.1f GB)",
                peak / 1e9, cfg.scheduler.max_num_batched_tokens, cfg.cache.gpu_memory_utilization * total / 1e9,
                cfg.cache.gpu_memory_utilization * 100, total / 1e9,
            )  # fmt: skip
        if blocks < need:
            raise ConfigError(
                f"the KV cache has room for {max(blocks, 0) * self.block_size} tokens, fewer than one "
                f"--max-model-len {self.max_model_len} sequence: lower --max-model-len or --trigger, or raise "
                "--gpu-memory-utilization"
            )
        return blocks

    def _profile_peak_bytes(self) -> int:
        """Peak device memory of a warm-up forward at the largest step (weights included)."""
        sched, mcfg = self.config.scheduler, self.model_config
        tokens = min(self.token_budget, self.max_model_len * sched.max_num_seqs)
        seqs = max(1, min(sched.max_num_seqs, -(-tokens // self.max_model_len)))
        per = -(-tokens // seqs)
        blocks_per = -(-per // self.block_size)
        tmp = KVCache(mcfg.num_layers, seqs * blocks_per, self.block_size, mcfg.num_kv_heads, mcfg.head_dim,
                      self.dtype, self.device)  # fmt: skip
        tmp_bytes = sum(t.numel() * t.element_size() for t in tmp.k + tmp.v)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        chunks = [
            SeqChunk([0] * per, 0, list(range(s * blocks_per, (s + 1) * blocks_per))) for s in range(seqs)
        ]
        inp = build_inputs(chunks, self.block_size, self.device)
        self.model.forward(inp.input_ids, inp.positions, inp.meta, tmp)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - tmp_bytes
        del tmp, inp
        torch.cuda.empty_cache()
        return peak

    def expert_stats(self) -> dict[str, float]:
        """MoE expert streaming counters for /metrics (cache hit rate, bytes per step); {} otherwise."""
        return self.layers.stats() if isinstance(self.layers, MoeLayers) else {}

    def execute(
        self,
        chunks: Sequence[SeqChunk],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
    ) -> list[int]:
        """Run one step; returns one sampled token id per chunk (callers ignore those of
        sequences still mid-prefill)."""
        try:
            if self.graphs is not None and self.graphs.can_run(chunks):
                logits = self.graphs.run(chunks)
            else:
                inputs = build_inputs(chunks, self.block_size, self.device)
                logits = self.model.forward(inputs.input_ids, inputs.positions, inputs.meta, self.kv)
        except BaseException:
            if isinstance(self.layers, TransferQueue):
                self.layers.reset()
            raise
        return sample_tokens(logits, params, seeds, steps)
