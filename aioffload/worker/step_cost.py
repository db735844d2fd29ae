"""What one step costs, measured at start-up; the scheduler sizes prefill chunks from it.

A decode-only step takes `decode_s` alone (measured: a CUDA-graph replay or an eager
step; with layers streamed it waits for their copies, so it is never below `floor_s`).
Prefill tokens add compute: `token_s` per token (2 x layer params at the measured dense
matmul rate) and `pair_s` per (query, visible key) pair of attention. While layers stream,
their compute hides under the copies and only the resident layers' share (`exposed`) of
the prefill compute x lengthens the step, until compute outgrows the copies:

    step_s(x) = max(alone_s + exposed * x, x)        alone_s = max(floor_s, decode_s)

(alone_s is never below the copy floor: when host cores compute part of the offloaded layers
a decode step can beat it (DESIGN.md section 8), but a step with a long prefill share streams
whole layers, so the floor is what such a step is measured against.)

The rule (DESIGN.md section 5): a step lasts at most `itl_factor` x a decode-only step, so
requests that are decoding keep their inter-token latency while a long prompt prefills;
the prefill share of a step is what fits in `prefill_budget_s`. While offload is active
the same rule sizes a lone prompt's chunks: each streamed step costs the copy floor anyway,
so a prompt takes as few of them as that much compute allows.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from aioffload.config import ModelConfig
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams

if TYPE_CHECKING:
    from aioffload.worker.worker import Worker

ITL_FACTOR = 2.0  # a step with a prefill share may last this many decode-only steps
# Attention kernels run below the dense matmul rate (FlashAttention-2 class on H100/H200:
# about half); `aioffload bench prefill` measures ours against it.
ATTENTION_EFFICIENCY = 0.5
MAX_PREFILL_TOKENS = 16384  # a streamed step's activations must stay small beside the KV cache


@dataclass(frozen=True)
class StepCost:
    floor_s: float  # copy floor: offloaded bytes / host-to-device bandwidth (0: all resident)
    decode_s: float  # a decode-only step alone, as measured
    token_s: float  # dense compute per prefill token
    pair_s: float  # attention compute per (query, visible key) pair
    exposed: float = 1.0  # share of prefill compute not hidden under copies (resident layers / all)
    itl_factor: float = ITL_FACTOR
    # Chunk sizes the worker has CUDA graphs for (worker/chunk_graphs.py; () without graphs): a
    # chunk cut short by the prefill share is cut to one of them, so its graph needs no padding.
    chunk_sizes: tuple[int, ...] = ()

    @property
    def alone_s(self) -> float:
        return max(self.floor_s, self.decode_s)

    def step_s(self, prefill_s: float) -> float:
        """Predicted seconds of a step that carries `prefill_s` of prefill compute."""
        return max(self.alone_s + self.exposed * prefill_s, prefill_s)

    def prefill_budget_s(self) -> float:
        """The most prefill compute one step may carry: step_s(x) <= itl_factor x alone_s."""
        limit = self.itl_factor * self.alone_s
        spare = limit - self.alone_s
        return max(0.0, min(limit, spare / self.exposed if self.exposed > 0 else limit))

    def chunk_s(self, n: int, start: int) -> float:
        """Compute seconds of prefill tokens at positions start .. start + n - 1 (token p sees p + 1 keys)."""
        return n * self.token_s + self.pair_s * (n * start + n * (n + 1) / 2)

    def max_chunk(self, start: int, seconds: float) -> int:
        """The most tokens from position `start` whose chunk_s fits in `seconds` (0 when none does)."""
        if seconds <= 0:
            return 0
        a, b = self.pair_s / 2, self.token_s + self.pair_s * (start + 0.5)  # chunk_s = a n^2 + b n
        n = seconds / b if a == 0 else (math.sqrt(b * b + 4 * a * seconds) - b) / (2 * a)
        n = int(n)
        while n > 0 and self.chunk_s(n, start) > seconds:  # float rounding at the boundary
            n -= 1
        return n

    def graph_chunk(self, n: int) -> int:
        """n, or the largest captured chunk size below it (n itself when none is)."""
        return max((c for c in self.chunk_sizes if c <= n), default=n)

    def prefill_token_budget(self, base: int, cap: int = MAX_PREFILL_TOKENS) -> int:
        """Tokens per step while offload is active: a fresh prompt's tokens that fit the prefill
        budget, never below `base` (--max-num-batched-tokens) nor above `cap`."""
        return max(base, min(cap, self.max_chunk(0, self.prefill_budget_s())))

    def describe(self) -> str:
        return (
            f"decode step {self.decode_s * 1e3:.1f} ms, copy floor {self.floor_s * 1e3:.1f} ms, "
            f"{self.token_s * 1e6:.1f} us/token, {self.pair_s * 1e12:.0f} ps per attention pair, "
            f"{self.exposed:.2f} exposed; prefill share up to "
            f"{self.prefill_budget_s() * 1e3:.1f} ms ({self.max_chunk(0, self.prefill_budget_s())} fresh tokens) "
            f"so a step stays within {self.itl_factor:g}x a decode-only step"
        )


def predict_step_cost(
    cfg: ModelConfig, layer_params: int, dense_flops: float, floor_s: float, exposed: float
) -> StepCost:
    """StepCost before any decode step was timed (decode_s = 0: a step alone costs the floor)."""
    pair_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # QK^T and PV, 2 FLOPs a multiply-add
    return StepCost(
        floor_s=floor_s,
        decode_s=0.0,
        token_s=2 * cfg.num_layers * layer_params / dense_flops,
        pair_s=pair_flops / (dense_flops * ATTENTION_EFFICIENCY),
        exposed=exposed,
    )


def measure_dense_flops(
    device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int, tokens: int = 2048, reps: int = 5
) -> float:
    """FLOP/s of the model's largest matmul ([tokens, H] x [H, 2I], the fused gate/up), timed with events."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)  # [T, H]
    w = torch.randn(2 * intermediate, hidden, device=device, dtype=dtype)  # [2I, H]
    F.linear(x, w)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        F.linear(x, w)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del x, w
    torch.cuda.empty_cache()
    return 2 * tokens * hidden * 2 * intermediate * reps / seconds


def time_decode_step(worker: Worker, reps: int = 3) -> float:
    """Median seconds of a one-token decode step through Worker.execute, the way the engine runs
    it (graphs when captured, the transfer ring when layers stream). It writes the K/V of one
    position into block 0, which no sequence owns yet."""
    chunk = [SeqChunk([0], 0, [0])]
    greedy = [SamplingParams(max_tokens=1, temperature=0.0)]
    worker.execute(chunk, greedy, [0], [0])  # warm-up (and compiles, on a graph-less worker)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        worker.execute(chunk, greedy, [0], [0])  # returns host ints: the step has finished
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pair_cost(shallow_s: float, deep_s: float, rows: int, depth: int) -> float:
    """Attention seconds per (query, visible key) pair from one chunk of `rows` tokens timed at
    position 0 and at position `depth`: the extra time is the rows x depth extra pairs."""
    return max(0.0, deep_s - shallow_s) / (rows * depth)


def time_chunk_depths(
    worker: Worker, rows: int = 128, deepest: int = 8192, reps: int = 3
) -> tuple[float, float, int, int] | None:
    """(seconds at position 0, seconds at depth, rows, depth) of a `rows`-token chunk graph replay, or
    None without chunk graphs or room. A chunk deep in a prompt runs few attention programs (one per
    head and query tile) that each walk the whole prefix: measured on the H200, a 16-stream mixed
    step deep in an 8k prompt took 16-17 ms where the model's pair cost (attention at half the
    dense rate) predicted ~10 (BENCHMARKS.md, third session, call 2). Writes K/V into blocks no
    sequence owns yet, as time_decode_step does."""
    runner = worker.chunk_graphs
    bs = worker.block_size
    depth = min(deepest, worker.max_model_len - rows, (worker.num_blocks - 1) * bs - rows) // bs * bs
    if runner is None or depth < 1024:
        return None
    table = list(range(-(-(depth + rows) // bs)))

    def timed(start: int) -> float:
        chunk = SeqChunk([0] * rows, start, table)
        runner.run(chunk)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.run(chunk)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return timed(0), timed(depth), rows, depth
