"""Placement tests: pure byte arithmetic on a Llama-3-8B-shaped config, no model-size allocations."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from aioffload.config import CacheConfig, ConfigError, ModelConfig, OffloadConfig, SchedulerConfig
from aioffload.model.layout import layer_layout
from aioffload.offload.placement import (
    HBM_BYTES_PER_S,
    Placement,
    estimate_activation_bytes,
    format_plan,
    plan_placement,
)

LLAMA3_8B = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    qkv_bias=False,
    qk_norm=False,
    checkpoint_dtype="bfloat16",
)
L = 32
# One layer, bf16: 2 norms [4096] + qkv [6144, 4096] + o [4096, 4096] + gate_up [28672, 4096]
# + down [4096, 14336]; every piece is a multiple of 128 elements, so no alignment padding.
LB = 2 * (2 * 4096 + 6144 * 4096 + 4096 * 4096 + 28672 * 4096 + 4096 * 14336)  # 436_224_000
EMBED = 128256 * 4096 * 2  # 1_050_673_152; lm_head (untied) is the same size
NORM = 4096 * 2
BASE = 2 * EMBED + NORM  # embed + lm_head + final norm: 2.10 GB
KVB = 2 * 32 * 16 * 8 * 128 * 2  # K and V, 32 layers, 16-token block, 8 heads x 128, bf16: 2 MiB
ACT = 750_000_000
H2D = 55.4e9
CACHE, SCHED = CacheConfig(), SchedulerConfig()  # util 0.9, block 16, 64 seqs, 2048 batched tokens


def plan(
    trigger: float | str = 1.0,
    total: float = 24e9,
    max_model_len: int = 8192,
    model: ModelConfig = LLAMA3_8B,
    sched: SchedulerConfig = SCHED,
    **offload: object,
) -> Placement:
    return plan_placement(
        model, 2, OffloadConfig(trigger=trigger, **offload), CACHE, sched, max_model_len, int(total), H2D, ACT
    )


def expected_kv_blocks(total: float, gpu: int, ring: int) -> int:
    return math.floor((0.9 * total - gpu - ring - ACT) / KVB)


def throughput(p: Placement, max_num_seqs: int, max_model_len: int) -> float:
    seqs = min(max_num_seqs, p.kv_tokens // max_model_len)
    return seqs / max(p.host_layer_bytes / H2D, p.gpu_weight_bytes / HBM_BYTES_PER_S)


def test_byte_figures_match_layout_and_estimate() -> None:
    assert LB == 436_224_000 == layer_layout(LLAMA3_8B).nbytes(torch.bfloat16)
    assert plan().layer_bytes == LB and plan().kv_block_bytes == KVB
    # 2048 tokens x (4 x 4096 + 6144 + 2 x 14336) x 2 B x 2 + 64 x 128256 x 4 B x 2 + 256 MiB
    want = 2048 * 51200 * 2 * 2 + 64 * 128256 * 8 + 256 * 2**20
    assert estimate_activation_bytes(LLAMA3_8B, 2, 2048, 64) == want == 753_532_928


@pytest.mark.parametrize(
    "total, trigger, resident",
    [
        # floor((T x total - BASE - 2 x LB) / LB) when the whole model does not fit under T x total
        (24e9, 0.29, 9),  # (6.96e9 - 2.1014e9 - 0.8724e9) / 0.4362e9 = 9.14
        (24e9, 0.5, 20),  # (12e9 - 2.9738e9) / 0.4362e9 = 20.69
        (24e9, 0.6, 26),  # (14.4e9 - 2.9738e9) / 0.4362e9 = 26.19
        (80e9, 0.1, 11),  # (8e9 - 2.9738e9) / 0.4362e9 = 11.52
        (80e9, 0.15, 20),  # (12e9 - 2.9738e9) / 0.4362e9 = 20.69
        (80e9, 0.5, 32),  # 40e9 >= BASE + 32 x LB = 16.06e9: everything resident
        (24e9, 0.75, 32),  # 18e9 >= 16.06e9
    ],
)
def test_trigger_places_layers_in_forward_order(total: float, trigger: float, resident: int) -> None:
    budget = trigger * total
    if resident < L:  # the count is the largest that fits with the 2-slot ring, and is not all of them
        assert BASE + resident * LB + 2 * LB <= budget < BASE + (resident + 1) * LB + 2 * LB
        assert budget < BASE + L * LB
    else:
        assert BASE + L * LB <= budget
    p = plan(trigger, total)
    assert p.resident_layers == tuple(range(resident))
    assert p.offloaded_layers == tuple(range(resident, L))
    assert p.gpu_weight_bytes == BASE + resident * LB
    assert p.host_weight_bytes == (L - resident) * LB
    assert p.ring_bytes == (2 * LB if resident < L else 0)
    assert p.kv_blocks == expected_kv_blocks(total, p.gpu_weight_bytes, p.ring_bytes)
    assert p.kv_tokens == 16 * p.kv_blocks
    assert p.predicted_step_floor_s == pytest.approx((L - resident) * LB / H2D)
    assert p.offload_active == (resident < L) and p.trigger == trigger and p.reason


def test_trigger_one_that_fits_offloads_nothing() -> None:
    p = plan(1.0, 80e9)
    assert p.resident_layers == tuple(range(L)) and p.offloaded_layers == () and not p.offload_active
    assert (p.gpu_weight_bytes, p.host_weight_bytes, p.ring_bytes) == (BASE + L * LB, 0, 0)
    assert p.predicted_step_floor_s == 0.0 and p.trigger == 1.0
    assert p.kv_blocks == expected_kv_blocks(80e9, BASE + L * LB, 0)  # 26314 blocks, 421k tokens


def test_trigger_one_too_big_names_a_trigger_that_works() -> None:
    # 16 GB card: 0.9 x 16e9 = 14.4e9 < 16.06e9 of weights.
    with pytest.raises(ConfigError) as err:
        plan(1.0, 16e9)
    msg = str(err.value)
    assert "16.06 GB" in msg and "14.40 GB" in msg and "--cpu-offload-gb" in msg
    trigger = float(re.search(r"--trigger (\S+)", msg).group(1))
    assert round(trigger * 20) == trigger * 20  # a multiple of 0.05
    p = plan(trigger, 16e9)
    assert p.offload_active and p.kv_tokens >= 8192
    with pytest.raises(ConfigError):  # and it is the largest such trigger
        plan(trigger + 0.05, 16e9)
    host_gb = float(re.search(r"--cpu-offload-gb ([\d.]+)", msg).group(1))
    q = plan(1.0, 16e9, cpu_offload_gb=host_gb)
    assert q.kv_tokens >= 8192 and q.resident_layers == p.resident_layers


def test_trigger_one_too_big_for_any_split_says_so() -> None:
    with pytest.raises(ConfigError, match="every decoder layer on the host"):
        plan(1.0, 4e9)


@pytest.mark.parametrize("gb", [0.1, 0.4, 4.0, 4.36224, 10.0, 13.9, 13.959168])
def test_cpu_offload_gb_keeps_the_smallest_sufficient_tail(gb: float) -> None:
    p = plan(1.0, 24e9, cpu_offload_gb=gb)
    n = L - len(p.resident_layers)
    assert p.offloaded_layers == tuple(range(L - n, L))
    assert p.host_weight_bytes >= gb * 1e9 - 1  # holds N GB ...
    assert p.host_weight_bytes - LB < gb * 1e9  # ... and one layer fewer would not
    assert p.ring_bytes == min(2, n) * LB  # the transfer queue allocates min(prefetch, offloaded) slots
    assert p.trigger == pytest.approx((p.gpu_weight_bytes + p.ring_bytes) / 24e9)


def test_cpu_offload_gb_zero_and_too_large() -> None:
    assert not plan(1.0, 24e9, cpu_offload_gb=0).offload_active
    with pytest.raises(ConfigError, match=r"--cpu-offload-gb 14 is more than all 32 decoder layers"):
        plan(1.0, 24e9, cpu_offload_gb=14.0)
    with pytest.raises(ConfigError, match="give only one"):
        plan(0.5, 24e9, cpu_offload_gb=1.0)


@pytest.mark.parametrize("trigger", [0.0, 0.05, 0.1])
def test_trigger_so_low_only_the_ring_fits(trigger: float) -> None:
    # 0.1 x 24e9 = 2.4e9 < BASE + 2 x LB = 2.97e9: no layer fits, yet the plan is valid.
    p = plan(trigger, 24e9)
    assert p.resident_layers == () and p.offloaded_layers == tuple(range(L))
    assert (p.gpu_weight_bytes, p.ring_bytes, p.host_weight_bytes) == (BASE, 2 * LB, L * LB)
    assert p.kv_blocks == expected_kv_blocks(24e9, BASE, 2 * LB) and p.kv_tokens >= 8192


def test_kv_too_small_names_max_model_len() -> None:
    with pytest.raises(ConfigError) as err:
        plan(0.5, 24e9, max_model_len=200_000)
    msg = str(err.value)
    assert "--max-model-len 200000" in msg and "lower --max-model-len (this plan holds" in msg
    # All resident under 0.85 x 24e9 leaves 4.79 GB of KV = 36.5k tokens < 65536; a lower trigger helps.
    with pytest.raises(ConfigError) as err:
        plan(0.85, 24e9, max_model_len=65536)
    msg = str(err.value)
    assert "--max-model-len 65536" in msg
    trigger = float(re.search(r"--trigger (\S+)", msg).group(1))
    assert plan(trigger, 24e9, max_model_len=65536).kv_tokens >= 65536
    fits = int(re.search(r"--max-model-len (\d+)$", msg).group(1))
    assert plan(0.85, 24e9, max_model_len=fits).kv_tokens == fits


def test_trigger_above_utilization_is_rejected() -> None:
    with pytest.raises(ConfigError, match="above --gpu-memory-utilization"):
        plan(0.95, 80e9)


SCENARIOS = [  # total, max_model_len, max_num_seqs
    (24e9, 8192, 64),
    (24e9, 2048, 256),
    (80e9, 8192, 64),
    (16e9, 4096, 64),  # all resident is invalid: auto must offload
    (16e9, 1024, 256),
]


@pytest.mark.parametrize("total, max_model_len, max_num_seqs", SCENARIOS)
def test_auto_maximises_predicted_throughput(total: float, max_model_len: int, max_num_seqs: int) -> None:
    sched = dataclasses.replace(SCHED, max_num_seqs=max_num_seqs)
    best = plan("auto", total, max_model_len, sched=sched)
    assert best.kv_tokens >= max_model_len
    scores = {}
    for r in range(L + 1):  # brute force: every split, placed through --cpu-offload-gb
        try:
            p = plan(1.0, total, max_model_len, sched=sched, cpu_offload_gb=(L - r) * LB / 1e9)
        except ConfigError:
            continue
        assert len(p.resident_layers) == r
        scores[r] = throughput(p, max_num_seqs, max_model_len)
    chosen = len(best.resident_layers)
    assert scores[chosen] == pytest.approx(throughput(best, max_num_seqs, max_model_len))
    assert scores[chosen] >= max(scores.values())
    assert chosen == max(r for r, s in scores.items() if s == scores[chosen])  # ties: more resident
    assert f"auto: {chosen} of 32 layers resident" in best.reason and "runner-up" in best.reason
    assert best.trigger == (1.0 if chosen == L else pytest.approx((BASE + chosen * LB + 2 * LB) / total))
    if total == 16e9:
        assert best.offload_active


def test_auto_without_any_valid_split_raises() -> None:
    with pytest.raises(ConfigError, match="--max-model-len 8192"):
        plan("auto", 4e9)


def test_embed_on_host_and_tied_lm_head() -> None:
    p = plan(0.29, 24e9, embed_on_host=True)
    # The embedding leaves the GPU (lm_head stays): one more layer fits, the floor ignores the embedding.
    assert len(p.resident_layers) == 11  # (6.96e9 - 1.0507e9 - 0.8724e9) / 0.4362e9 = 11.55
    assert p.gpu_weight_bytes == EMBED + NORM + 11 * LB and p.host_weight_bytes == 21 * LB + EMBED
    assert p.predicted_step_floor_s == pytest.approx(21 * LB / H2D)
    tied = dataclasses.replace(LLAMA3_8B, tie_word_embeddings=True)
    assert plan(1.0, 24e9, model=tied).gpu_weight_bytes == EMBED + NORM + L * LB  # shared
    assert plan(1.0, 24e9, model=tied, embed_on_host=True).gpu_weight_bytes == EMBED + NORM + L * LB  # copy


def test_24gb_emulation_streams_about_10gb() -> None:
    # The smallest trigger (in 0.01 steps) that keeps ~6 GB of weights on a 24 GB card.
    trigger = next(k / 100 for k in range(1, 91) if plan(k / 100, 24e9).gpu_weight_bytes >= 6e9)
    p = plan(trigger, 24e9)
    assert trigger == 0.29 and len(p.resident_layers) == 9
    assert p.gpu_weight_bytes == pytest.approx(6.03e9, abs=0.01e9)
    assert p.host_weight_bytes == 23 * LB == pytest.approx(10e9, abs=0.1e9)
    assert p.predicted_step_floor_s == pytest.approx(0.1811, abs=1e-4)  # 10.03 GB / 55.4 GB/s


def test_format_plan_reports_the_numbers() -> None:
    p = plan(0.29, 24e9)
    text = format_plan(p, LLAMA3_8B, 16)
    assert re.search(r"layers 0-8\s+GPU\s+436\.2 MB each\s+3\.93 GB", text)
    assert re.search(r"layers 9-31\s+host\s+436\.2 MB each\s+10\.03 GB", text)
    assert re.search(r"embed_tokens\s+GPU\s+1\.05 GB", text) and re.search(r"lm_head\s+GPU\s+1\.05 GB", text)
    assert "GPU weights      6.03 GB" in text and "host weights     10.03 GB" in text
    assert "prefetch ring    0.87 GB (2 slots)" in text and "activations      0.75 GB" in text
    assert f"{p.kv_blocks} blocks x 16 tokens = {16 * p.kv_blocks} tokens" in text
    assert "181.1 ms per decode step" in text and "55.4 GB/s" in text
    assert "trigger          0.29" in text and p.reason in text
    full = format_plan(plan(1.0, 80e9), LLAMA3_8B, 16)
    assert re.search(r"layers 0-31\s+GPU\s+436\.2 MB each\s+13\.96 GB", full)
    assert "no offload: step bound by HBM" in full and "host" not in full.split("final norm")[0]
    assert "trigger          1.0 (offload off)" in full
    one = format_plan(plan(1.0, 24e9, cpu_offload_gb=0.1), LLAMA3_8B, 16)
    assert re.search(r"layers 0-30\s+GPU", one) and re.search(r"layer 31\s+host", one)
