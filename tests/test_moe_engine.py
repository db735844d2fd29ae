"""An MoE model through the engine on the CPU: with half the routed experts offloaded, greedy output
is bit-identical to all-resident through prefill, decode, chunked prefill and preemption; the
expert counters reach engine.stats() and /metrics."""

from __future__ import annotations

import pytest
import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.model.layout import expert_layout
from aioffload.offload.expert_layers import MoeLayers
from aioffload.offload.expert_stream import ExpertStream
from aioffload.serving.metrics import Metrics
from tests.test_engine import make_engine, prompts, run_all, spy_preemptions
from tests.tiny_models import add_word_tokenizer, make_moe_checkpoint


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Qwen2-MoE: MoE layers 0, 2, 3 (5 experts each, top-2, shared expert), dense layer 1.
    root = tmp_path_factory.mktemp("moe_engine")
    return str(add_word_tokenizer(make_moe_checkpoint(root, "qwen2_moe-e5-top2-shared", seed=5)))


@pytest.fixture(scope="module")
def resident(moe: str) -> list[list[int]]:
    return run_all(make_engine(moe, num_blocks=40, budget=16), prompts(12))


def expert_gb(model: str, n: int) -> float:
    cfg = Checkpoint.open(model).model_config
    return n * expert_layout(cfg).numel * torch.float32.itemsize / 1e9


# auto at 1 MB/s: routed for decode steps, whole sets for prefill-sized ones (at 25 GB/s the 150 us routed
# bubble outweighs these 24.6 kB experts and every layer streams whole). Cache None: as the plan sizes it.
@pytest.mark.parametrize(
    "stream, cache_gb, h2d_gbps", [("routed", 0.0, None), ("full", 0.0, None), ("auto", None, 0.001)]
)
def test_offloaded_experts_bit_identical_including_chunked_and_preempted(
    moe: str, resident: list[list[int]], stream: str, cache_gb: float | None, h2d_gbps: float | None
) -> None:
    ps = prompts(12)
    engine = make_engine(moe, num_blocks=40, budget=16, cpu_offload_gb=expert_gb(moe, 8), expert_stream=stream,
                         expert_cache_gb=cache_gb, h2d_gbps=h2d_gbps)  # fmt: skip
    worker = engine.worker
    assert isinstance(worker.layers, MoeLayers) and isinstance(worker.layers.experts, ExpertStream)
    plan = worker.placement.experts
    assert plan is not None and plan.resident == ((0, 5), (2, 2), (3, 0))  # 8 of 15 experts on the host
    assert worker.offload_active and worker.offload_bytes_per_step == 8 * worker.layers.experts.expert_bytes
    preempted = spy_preemptions(engine)
    assert run_all(engine, ps) == resident
    assert preempted, "a 40-block pool for 12 sequences must preempt and resume some"
    assert max(len(p) for p in ps) > 16  # prompts longer than the budget: chunked prefill happened
    stats = engine.stats()
    total = worker.layers.experts.total
    assert (total.routed_layers > 0) == (stream != "full") and (total.full_layers > 0) == (stream != "routed")
    if cache_gb is None:  # the CPU's nominal device leaves room to cache every offloaded expert
        assert plan.cache_experts == 8 and stats["expert_cache_hit_rate"] > 0.5
        assert stats["expert_copy_bytes_per_step"] == 0  # by the last step every routed expert was cached
    else:
        assert plan.cache_experts == 0 and stats["expert_cache_hit_rate"] == 0.0
        assert stats["expert_copy_bytes_per_step"] > 0
    m = Metrics()
    m.update_engine_stats(stats)
    text = m.render().decode()
    assert f"aioffload_expert_cache_hit_rate {stats['expert_cache_hit_rate']}" in text
    assert "aioffload_expert_copy_bytes_per_step" in text and "aioffload_expert_routed_bytes_per_step" in text


def test_all_resident_moe_has_no_expert_counters(moe: str) -> None:
    engine = make_engine(moe)
    assert isinstance(engine.worker.layers, MoeLayers) and not engine.worker.layers.streams
    assert not engine.worker.offload_active and engine.worker.offload_bytes_per_step == 0
    assert "expert_cache_hit_rate" not in engine.stats()
