"""Routed or whole-set streaming: the union model and the per-layer cost comparison."""

from __future__ import annotations

import pytest

from aioffload.offload.expert_modes import ROUTED_BUBBLE_S, UnionModel, choose_full
from aioffload.offload.placement import HBM_BYTES_PER_S

E, K = 128, 8  # Qwen3-30B-A3B
EXPERT_BYTES = 9_437_184
BUBBLE = ROUTED_BUBBLE_S * 54e9 / EXPERT_BYTES  # ~0.86 experts at 54 GB/s
READ = 54e9 / HBM_BYTES_PER_S  # an expert's GEMM reads its 9.4 MB from HBM in 0.018 of its copy time


def test_uniform_union_prediction() -> None:
    m = UnionModel(E, K)
    assert m.predict(0, 1) == pytest.approx(8.0)
    assert m.predict(0, 8) == pytest.approx(128 * (1 - (120 / 128) ** 8))  # 51.6
    assert m.predict(0, 256) == pytest.approx(128.0, abs=1e-3)
    assert UnionModel(4, 4).predict(0, 1) == 4.0  # top-k = every expert


def test_observed_skew_lowers_the_prediction() -> None:
    m = UnionModel(E, K)
    m.observe(3, 64, 40)  # 64 tokens reached only 40 experts: a skewed router
    assert m.predict(3, 64) == pytest.approx(40, rel=0.01)  # the first observation is taken as is
    assert m.predict(4, 64) > 120  # other layers keep the uniform figure
    m.observe(3, 1, 8)  # batch 1 says nothing about skew
    assert m.predict(3, 64) == pytest.approx(40, rel=0.01)
    m.observe(3, 64, 128)  # a full union: capped, pulls the estimate up
    assert 40 < m.predict(3, 64) < 128


@pytest.mark.parametrize(
    "tokens, cached, full",
    [(1, 0, False), (8, 0, False), (32, 0, False), (64, 0, True), (256, 0, True), (8, 100, False), (32, 120, True)],
)
def test_choose_full_for_qwen3_30b(tokens: int, cached: int, full: bool) -> None:
    u = UnionModel(E, K).predict(0, tokens)
    assert choose_full(u, E, E, cached, BUBBLE, READ) is full


def test_the_gemm_read_tips_64_tokens_to_whole_sets() -> None:
    u = UnionModel(E, K).predict(0, 64)  # 125.95 of 128
    assert u + BUBBLE < E  # copies + bubble alone would still favour routed
    assert u * (1 + READ) + BUBBLE > E  # the GEMMs reading 126 experts from HBM tip it


def test_nothing_offloaded_is_never_full() -> None:
    assert choose_full(128.0, E, 0, 0, BUBBLE, READ) is False
