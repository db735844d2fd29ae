"""The step cost model the scheduler sizes prefill chunks from (pure arithmetic), and its GPU probes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from aioffload.worker.step_cost import (
    StepCost,
    measure_dense_flops,
    pair_cost,
    predict_step_cost,
    time_chunk_depths,
    time_decode_step,
)
from aioffload.worker.worker import Worker
from tests.helpers import one_torch_thread
from tests.tiny_models import make_checkpoint

# Llama-3-8B on an H200 (measured figures from docs/DESIGN.md): 218M parameters per layer, a
# 194 ms copy floor with 24 of 32 layers streamed, ~650 TFLOP/s dense.
LLAMA3_8B = ModelConfig("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 5e5, 8192, False, False,
                        False, "bfloat16")  # fmt: skip
LAYER_PARAMS = 218_112_000


def test_chunk_seconds_count_dense_and_causal_attention_work() -> None:
    c = StepCost(floor_s=0.0, decode_s=0.005, token_s=2e-5, pair_s=1e-9)
    # 4 tokens at positions 10..13 see 11 + 12 + 13 + 14 = 50 keys
    assert c.chunk_s(4, 10) == pytest.approx(4 * 2e-5 + 50 * 1e-9)
    assert c.chunk_s(0, 100) == 0.0


@pytest.mark.parametrize("start", [0, 1, 777, 8000, 31000])
@pytest.mark.parametrize("seconds", [1e-6, 0.003, 0.05, 0.4])
def test_max_chunk_is_the_largest_chunk_that_fits(start: int, seconds: float) -> None:
    c = StepCost(floor_s=0.0, decode_s=0.005, token_s=2.1e-5, pair_s=1.6e-9)
    n = c.max_chunk(start, seconds)
    assert n >= 0 and c.chunk_s(n, start) <= seconds < c.chunk_s(n + 1, start)
    no_attention = StepCost(floor_s=0.0, decode_s=0.005, token_s=2.1e-5, pair_s=0.0)
    assert no_attention.max_chunk(start, seconds) == math.floor(seconds / 2.1e-5 + 1e-9)


def test_resident_prefill_share_is_what_keeps_a_step_within_the_itl_factor() -> None:
    c = StepCost(floor_s=0.0, decode_s=0.006, token_s=2e-5, pair_s=0.0, itl_factor=2.0)
    assert c.alone_s == 0.006
    assert c.prefill_budget_s() == pytest.approx(0.006)  # a step of decodes + prefill = 2 x 6 ms
    assert c.step_s(c.prefill_budget_s()) == pytest.approx(2 * c.alone_s)
    assert c.max_chunk(0, c.prefill_budget_s()) == 300
    assert StepCost(0.0, 0.006, 2e-5, 0.0, itl_factor=1.0).prefill_budget_s() == 0.0


def test_offloaded_step_hides_streamed_layers_compute_under_the_copies() -> None:
    # 8 of 32 layers resident: a quarter of the prefill compute lengthens a 194 ms streamed step,
    # until compute passes the copies (then the step is the compute).
    c = StepCost(floor_s=0.194, decode_s=0.197, token_s=2e-5, pair_s=0.0, exposed=0.25)
    assert c.step_s(0.1) == pytest.approx(0.197 + 0.025)
    assert c.step_s(0.5) == pytest.approx(0.5)
    assert c.prefill_budget_s() == pytest.approx(2 * 0.197)  # compute-bound limit, not the exposed one
    assert c.step_s(c.prefill_budget_s()) == pytest.approx(2 * c.alone_s)


def test_offload_token_budget_takes_an_8k_prompt_in_one_streamed_step() -> None:
    c = predict_step_cost(LLAMA3_8B, LAYER_PARAMS, 650e12, floor_s=0.194, exposed=0.25)
    assert c.token_s == pytest.approx(2 * 32 * LAYER_PARAMS / 650e12)  # ~21.5 us
    budget = c.prefill_token_budget(2048)
    assert 8000 < budget < 16384  # an 8k prompt: one streamed step instead of three
    assert c.chunk_s(budget, 0) <= c.prefill_budget_s() < c.chunk_s(budget + 1, 0)
    assert c.prefill_token_budget(2048, cap=4096) == 4096
    assert c.prefill_token_budget(20000) == 20000  # never below --max-num-batched-tokens


def test_decode_step_timing_runs_a_real_step(tmp_path: Path) -> None:
    """time_decode_step drives Worker.execute: the K of position 0 lands in block 0 (which nobody
    owns at start-up), and the CPU worker has no step cost (no bound: the scheduler's default)."""
    ckpt = make_checkpoint(tmp_path, "llama")
    config = EngineConfig(model=str(ckpt), device="cpu", cache=CacheConfig(num_blocks=64, block_size=4),
                          scheduler=SchedulerConfig(max_model_len=128)).validate()  # fmt: skip
    worker = Worker(config, Checkpoint.open(ckpt))
    assert worker.step_cost is None
    assert not worker.kv.k[0][0, 0].any()
    with one_torch_thread():
        seconds = time_decode_step(worker, reps=3)
    assert 0 < seconds < 10
    assert worker.kv.k[0][0, 0].any() and not worker.kv.k[0][0, 1].any()


def test_a_measured_pair_cost_shrinks_chunks_deep_in_a_prompt() -> None:
    # 128 rows: 10 ms at position 0, 16 ms at 8192 -> 6 ms over 128 x 8192 extra pairs
    pair = pair_cost(0.010, 0.016, 128, 8192)
    assert pair == pytest.approx(0.006 / (128 * 8192))
    assert pair_cost(0.010, 0.009, 128, 8192) == 0.0  # noise never makes attention free or negative
    c = StepCost(floor_s=0.0, decode_s=0.0058, token_s=17.3e-6, pair_s=1.28e-9)  # the model: half the dense rate
    slow = StepCost(floor_s=0.0, decode_s=0.0058, token_s=17.3e-6, pair_s=pair)
    share = c.prefill_budget_s()
    assert c.max_chunk(0, share) > slow.max_chunk(0, share) > 0.9 * c.max_chunk(0, share)  # fresh: little changes
    assert slow.max_chunk(8000, share) < c.max_chunk(8000, share) // 2  # deep in the prompt, much smaller chunks
    assert slow.chunk_s(slow.max_chunk(8000, share), 8000) <= share


def test_chunk_depths_need_chunk_graphs(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, "llama")
    config = EngineConfig(model=str(ckpt), device="cpu", cache=CacheConfig(num_blocks=64, block_size=4),
                          scheduler=SchedulerConfig(max_model_len=128)).validate()  # fmt: skip
    assert time_chunk_depths(Worker(config, Checkpoint.open(ckpt))) is None  # a CPU worker captures no graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_flops_probe_on_the_gpu() -> None:
    flops = measure_dense_flops(torch.device("cuda"), torch.bfloat16, 4096, 14336)
    assert 50e12 < flops < 2.5e15  # an H100/H200 runs this bf16 matmul at ~600-750 TFLOP/s
