"""Expert-granular placement on the Qwen3-30B-A3B shape: byte arithmetic only, nothing allocated."""

from __future__ import annotations

import math
import re

import pytest

from aioffload.bench.synthetic import hf_config
from aioffload.config import CacheConfig, ConfigError, ModelConfig, OffloadConfig, SchedulerConfig
from aioffload.model.layout import expert_layout, layer_layout
from aioffload.offload.placement import Placement, format_plan, plan_placement

QWEN3_30B = ModelConfig.from_hf(hf_config("qwen3-30b-a3b"))
E, LAYERS = 128, 48
EB = 3 * 768 * 2048 * 2  # one expert, bf16: gate, up [768, 2048], down [2048, 768] = 9.44 MB
# attention: q [4096, 2048], k, v [512, 2048], o [2048, 4096]; router [128, 2048]; 2 norms [2048]; q/k norms [128]
NON_EXPERT = 2 * (4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096 + 128 * 2048 + 2 * 2048 + 2 * 128)
VOCAB = 151936 * 2048 * 2
FIXED = 2 * VOCAB + 2048 * 2 + LAYERS * NON_EXPERT  # embedding, lm_head, final norm, every non-expert buffer
ACT = 500_000_000
H2D = 54e9
SCHED = SchedulerConfig(max_num_seqs=64)


def plan(total: float = 24e9, max_model_len: int = 4096, **offload: object) -> Placement:
    return plan_placement(
        QWEN3_30B,
        2,
        OffloadConfig(**offload),
        CacheConfig(),
        SCHED,
        max_model_len,
        int(total),
        H2D,
        ACT,  # type: ignore[arg-type]
    )


def test_byte_figures_match_the_layouts() -> None:
    assert expert_layout(QWEN3_30B).numel * 2 == EB
    assert layer_layout(QWEN3_30B, 0).numel * 2 == NON_EXPERT
    assert FIXED + LAYERS * E * EB == pytest.approx(61.06e9, rel=1e-3)


@pytest.mark.parametrize("trigger", [0.3, 0.5, 0.6, 0.7])
def test_trigger_fills_whole_expert_sets_in_forward_order(trigger: float) -> None:
    p = plan(trigger=trigger)
    x = p.experts
    assert x is not None
    budget = trigger * 24e9
    staging = 2 * E * EB
    r = math.floor((budget - FIXED - staging) / EB)  # every expert up to the budget, staging counted
    assert sum(n for _, n in x.resident) == r
    full, rest = divmod(r, E)
    assert x.resident == tuple((i, E if i < full else rest if i == full else 0) for i in range(LAYERS))
    assert p.gpu_weight_bytes == FIXED + r * EB and p.host_weight_bytes == (LAYERS * E - r) * EB
    assert p.ring_bytes == staging and x.staging_slots == 2
    assert p.offloaded_layers == tuple(range(full, LAYERS)) and p.resident_layers == tuple(range(full))
    assert p.predicted_step_floor_s == pytest.approx((LAYERS * E - r) * EB / H2D)
    kv_block = 2 * LAYERS * 16 * 4 * 128 * 2
    assert p.kv_blocks == math.floor((0.9 * 24e9 - FIXED - r * EB - staging - ACT) / kv_block)


def test_cpu_offload_gb_offloads_the_last_experts() -> None:
    p = plan(cpu_offload_gb=50, max_model_len=1024)
    n = math.ceil(50e9 / EB)  # the fewest experts holding >= 50 GB
    assert p.experts is not None and p.experts.offloaded_experts == n
    assert p.host_weight_bytes == n * EB
    assert p.trigger == pytest.approx((FIXED + (LAYERS * E - n) * EB + 2 * E * EB) / 24e9)
    with pytest.raises(ConfigError, match=r"more than all 6144 routed experts hold \(57\.98 GB\)"):
        plan(cpu_offload_gb=60)


def test_everything_fits_on_a_big_card() -> None:
    p = plan(total=141e9)
    assert p.experts is not None and p.experts.offloaded_experts == 0 and not p.offload_active
    assert p.ring_bytes == 0 and p.experts.staging_slots == 0 and p.experts.cache_experts == 0
    assert p.trigger == 1.0 and "offload off" in p.reason


def test_non_expert_weights_must_fit_the_trigger() -> None:
    with pytest.raises(ConfigError, match=r"attention, norms, router and shared experts .* give --trigger 0\.23 or"):
        plan(trigger=0.1)


def test_trigger_one_on_a_small_card_names_a_trigger_that_works() -> None:
    with pytest.raises(ConfigError, match=r"the KV cache gets 0 tokens .*; try --trigger 0\.85") as e:
        plan()
    ok = float(re.search(r"--trigger ([0-9.]+)", str(e.value)).group(1))  # type: ignore[union-attr]
    assert plan(trigger=ok).kv_tokens >= 4096


def test_expert_cache_takes_spare_kv_memory_or_the_given_size() -> None:
    # 64 sequences x 1024 tokens need 4096 KV blocks; the rest of the KV share becomes expert cache.
    p = plan(trigger=0.5, max_model_len=1024)
    x = p.experts
    assert x is not None and x.cache_experts > 0
    assert p.kv_blocks >= 64 * 1024 // 16
    assert p.kv_blocks - 64 * 1024 // 16 < EB // (2 * LAYERS * 16 * 4 * 128 * 2) + 1  # less than one expert left
    given = plan(trigger=0.5, expert_cache_gb=1.0)
    assert given.experts is not None and given.experts.cache_experts == math.floor(1e9 / EB)


def test_auto_picks_whole_expert_sets() -> None:
    p = plan(trigger="auto")
    assert p.experts is not None and sum(n for _, n in p.experts.resident) % E == 0
    assert p.kv_tokens >= 4096


def test_plan_text_shows_experts_on_gpu_and_host_per_layer() -> None:
    p = plan(trigger=0.6)
    text = format_plan(p, QWEN3_30B, 16)
    x = p.experts
    assert x is not None
    full = sum(1 for _, n in x.resident if n == E)
    split = next(n for _, n in x.resident if 0 < n < E)
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert f"layers 0-{full - 1} GPU 128 experts x 9.4 MB {full * E * EB / 1e9:.2f} GB" in rows
    assert f"layer {full} split {split} GPU + {E - split} host experts x 9.4 MB 1.21 GB" in rows
    assert f"layers {full + 1}-47 host 128 experts x 9.4 MB {(47 - full) * E * EB / 1e9:.2f} GB" in rows
    assert f"layers 0-47 GPU attention, norms, router {LAYERS * NON_EXPERT / 1e9:.2f} GB" in rows
    routed = sum(8 * (E - n) / E for _, n in x.resident) * EB
    assert f"routed floor     {routed / H2D * 1e3:.1f} ms at batch 1" in text
    assert f"step floor       {p.predicted_step_floor_s * 1e3:.1f} ms copying every offloaded expert" in text
    assert "expert staging   2.42 GB (2 slots of 128 experts)" in text


def test_aioffload_plan_on_an_moe_checkpoint(tmp_path, capsys) -> None:
    from aioffload.bench.synthetic import make_synthetic_checkpoint
    from aioffload.cli import main

    path = make_synthetic_checkpoint(tmp_path / "m", "tiny-moe", device="cpu")  # bf16, 4 layers x 8 experts
    rc = main(["plan", "--model", str(path), "--dtype", "bfloat16", "--gpu-memory-gb", "1", "--trigger", "0.0006",
               "--expert-stream", "routed", "--expert-cache-gb", "0.0001", "--hybrid", "on"])  # fmt: skip
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0
    assert "host cores of this machine calibrated" not in out  # MoE layers never split, as in the worker
    eb = 3 * 32 * 64 * 2  # 12.3 kB per expert in bf16
    assert "(Qwen3MoeForCausalLM, 4 layers, bfloat16)" in out
    assert "layers 0-3 GPU attention, norms, router" in out
    assert re.search(r"layers? [0-9-]+ (GPU|split) ", out)
    assert re.search(r"layers? [0-9-]+ host 8 experts x 12\.3 kB", out)
    assert re.search(rf"expert cache [0-9.]+ [kMG]?B \({math.floor(1e5 / eb)} experts; streaming routed\)", out)
    assert "routed floor" in out and "step floor" in out


def test_expert_flags_are_validated(capsys) -> None:
    from aioffload.cli import main

    assert main(["plan", "--expert-stream", "sometimes"]) == 2  # one-line errors, exit status 2
    assert "--expert-stream must be one of auto, routed, full" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a typed flag: argparse refuses it, status 2
        main(["plan", "--expert-cache-gb", "-1"])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="--expert-cache-gb must be >= 0"):
        from aioffload.config import EngineConfig

        EngineConfig(model="m", offload=OffloadConfig(expert_cache_gb=-1.0)).validate()


def test_a_fixed_kv_pool_applies_to_moe_plans_too() -> None:
    """--num-kv-blocks / the CPU's --cpu-kv-cache-gb fix the pool for MoE models as for dense ones:
    the plan has that many blocks, and one too small for a sequence is refused before loading."""
    def fixed(blocks: int) -> Placement:
        return plan_placement(QWEN3_30B, 2, OffloadConfig(trigger=0.5), CacheConfig(), SCHED, 4096, int(24e9), H2D,
                              ACT, fixed_kv_blocks=blocks)  # type: ignore[arg-type]  # fmt: skip

    assert fixed(300).kv_blocks == 300 and plan(trigger=0.5).kv_blocks != 300
    with pytest.raises(ConfigError, match="4096"):
        fixed(8)  # 128 tokens
