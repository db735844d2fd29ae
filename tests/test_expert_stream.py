"""Routed-expert streaming on the CPU: with experts offloaded (routed, whole-set or auto streaming,
with and without the expert cache), prefill, decode and chunked prefill are bit-identical to
all-resident experts; copies are exactly the routed union; an interrupted forward recovers."""

from __future__ import annotations

import pytest
import torch

from aioffload.attention.backends import SdpaBackend
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.model.layout import expert_layout
from aioffload.offload.expert_layers import MoeLayers, ResidentExperts
from aioffload.offload.expert_placement import ExpertPlan
from aioffload.offload.expert_stream import ExpertStream
from aioffload.worker.model_loader import build_model
from tests.helpers import CPU, FailOnce, Runner, one_torch_thread
from tests.tiny_models import make_moe_checkpoint

PROMPTS = [[1, 5, 9, 33, 7, 100, 3], [1, 200, 201, 17], [1, 42] * 6]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    # Qwen2-MoE with a shared expert and a dense layer 1 (MoE layers 0, 2, 3; 5 experts, top-2);
    # Mixtral top-1 of 3 (every layer MoE).
    return {
        "qwen2": make_moe_checkpoint(root, "qwen2_moe-e5-top2-shared", seed=2),
        "mixtral": make_moe_checkpoint(root, "mixtral-e3-top1", seed=4),
    }


def expert_plan(
    path, resident: dict[int, int], mode: str, cache: int = 0, slots: int = 2, h2d: float = 25e9
) -> ExpertPlan:
    cfg = Checkpoint.open(path).model_config
    return ExpertPlan(
        num_experts=cfg.num_experts, expert_bytes=expert_layout(cfg).numel * 4,
        resident=tuple((layer, resident.get(layer, cfg.num_experts)) for layer in cfg.moe_layers),
        staging_slots=slots, cache_experts=cache, stream_mode=mode, h2d_bytes_per_s=h2d,
    )  # fmt: skip


def build(path, plan: ExpertPlan | None = None, attention=None):
    return build_model(Checkpoint.open(path), torch.float32, CPU, attention or SdpaBackend(), 512, experts=plan)


@pytest.fixture(scope="module")
def reference(paths):
    out = {}
    for name, path in paths.items():
        model, layers = build(path)
        assert isinstance(layers, MoeLayers) and isinstance(layers.experts, ResidentExperts)
        assert not layers.streams and layers.bytes_per_step == 0
        out[name] = {None: Runner(model, PROMPTS).generate(5), 3: Runner(build(path)[0], PROMPTS).generate(3, chunk=3)}
    return out


def assert_same(ours, ref):
    pre, dec, gen = ours
    pre_r, dec_r, gen_r = ref
    assert torch.equal(pre, pre_r), f"prefill: max abs diff {(pre - pre_r).abs().max().item()}"
    for step, (a, b) in enumerate(zip(dec, dec_r, strict=True)):
        assert torch.equal(a, b), f"decode step {step}: max abs diff {(a - b).abs().max().item()}"
    assert gen == gen_r


# (checkpoint, resident experts per MoE layer (absent: all), mode, cache entries, staging slots)
CASES = [
    ("qwen2", {0: 5, 2: 0, 3: 0}, "routed", 0, 2),  # half of 15 experts offloaded, whole layers first
    ("qwen2", {0: 5, 2: 3, 3: 0}, "routed", 0, 1),  # a split layer: 3 resident, 2 streamed
    ("qwen2", {0: 5, 2: 3, 3: 0}, "full", 0, 2),
    ("qwen2", {0: 5, 2: 3, 3: 0}, "auto", 0, 2),
    ("qwen2", {0: 0, 2: 0, 3: 0}, "routed", 4, 2),  # every expert streamed, through a small cache
    ("qwen2", {0: 0, 2: 0, 3: 0}, "full", 4, 3),
    ("qwen2", {0: 2, 2: 5, 3: 1}, "auto", 100, 2),  # any split works, the cache holds everything
    ("mixtral", {0: 3, 1: 3, 2: 1, 3: 0}, "routed", 0, 2),
    ("mixtral", {0: 0, 1: 0, 2: 0, 3: 0}, "full", 2, 1),
]


@pytest.mark.parametrize("name, resident, mode, cache, slots", CASES)
def test_streamed_prefill_and_decode_bit_identical(paths, reference, name, resident, mode, cache, slots):
    model, layers = build(paths[name], expert_plan(paths[name], resident, mode, cache, slots))
    assert isinstance(layers, MoeLayers) and layers.streams
    stream = layers.experts
    assert isinstance(stream, ExpertStream)
    assert stream.order == sorted(layer for layer, n in resident.items() if n < stream.num_experts)
    assert_same(Runner(model, PROMPTS).generate(5), reference[name][None])


@pytest.mark.parametrize("name, resident, mode, cache, slots", [CASES[1], CASES[2], CASES[6], CASES[8]])
def test_streamed_chunked_prefill_bit_identical(paths, reference, name, resident, mode, cache, slots):
    model, _ = build(paths[name], expert_plan(paths[name], resident, mode, cache, slots))
    assert_same(Runner(model, PROMPTS).generate(3, chunk=3), reference[name][3])


def test_routed_mode_copies_exactly_the_routed_offloaded_experts(paths):
    path = paths["qwen2"]
    model, layers = build(path, expert_plan(path, {0: 5, 2: 3, 3: 0}, "routed"))
    stream = layers.experts
    runner = Runner(model, PROMPTS[:1])
    nxt = runner.prefill()[0].argmax(-1).tolist()
    eb = stream.expert_bytes
    for _ in range(3):
        nxt = runner.decode_step(nxt).argmax(-1).tolist()
        stream.end_step()
        s = stream.last
        assert s.routed_layers == 2 and s.full_layers == 0
        assert s.copied_bytes == s.routed_bytes > 0  # no cache: every routed offloaded expert copied once
        # batch 1, top-2: at most 2 experts per layer, layer 2's experts 0-2 are resident (device to device)
        assert s.routed_bytes <= 4 * eb and s.routed_bytes % eb == 0


def test_full_mode_copies_every_offloaded_expert_per_step(paths):
    path = paths["qwen2"]
    model, layers = build(path, expert_plan(path, {0: 5, 2: 3, 3: 0}, "full"))
    stream = layers.experts
    assert stream.bytes_per_step == (2 + 5) * stream.expert_bytes
    runner = Runner(model, PROMPTS)
    nxt = runner.prefill()[0].argmax(-1).tolist()
    for _ in range(3):  # steady state: each step issues one load per streamed layer (the ring runs across steps)
        nxt = runner.decode_step(nxt).argmax(-1).tolist()
        stream.end_step()
        assert stream.last.full_layers == 2 and stream.last.routed_layers == 0
        assert stream.last.copied_bytes == stream.bytes_per_step


def test_cache_serves_repeated_routing(paths, reference):
    path = paths["qwen2"]
    model, layers = build(path, expert_plan(path, {0: 0, 2: 0, 3: 0}, "routed", cache=15))
    stream = layers.experts
    assert_same(Runner(model, PROMPTS).generate(5), reference["qwen2"][None])
    first = stream.cache.hits, stream.cache.misses
    assert first[1] <= 15  # each of the 15 offloaded experts is copied from the host at most once
    stream.end_step()
    copied_before = stream.step.copied_bytes
    assert_same(Runner(model, PROMPTS).generate(5), reference["qwen2"][None])  # the same requests again
    assert stream.cache.misses == first[1] and stream.cache.hits > first[0]
    assert stream.step.copied_bytes == copied_before == 0
    assert (
        layers.stats()["expert_cache_hit_rate"] == pytest.approx(stream.cache.hit_rate) and stream.cache.hit_rate > 0.5
    )


def test_auto_mode_picks_routed_for_small_steps_and_whole_sets_for_large_ones(paths):
    path = paths["qwen2"]
    # A slow link (1 MB/s): the routed bubble costs 150 us x 1 MB/s = 0.006 of a 24.6 kB expert.
    model, layers = build(path, expert_plan(path, {0: 0, 2: 0, 3: 0}, "auto", h2d=1e6))
    stream = layers.experts
    assert stream.bubble_experts == pytest.approx(150e-6 * 1e6 / stream.expert_bytes)
    stream.begin_step(1)  # one token, top-2 of 5: routed (2 experts + the bubble < 5)
    assert stream.full == [False, False, False] and stream._loaded == 0  # nothing queued before the router
    stream.begin_step(64)  # 64 tokens reach every expert: whole sets, queued ahead on the ring
    assert stream.full == [True, True, True] and stream._loaded == stream.ring
    # At 25 GB/s the same bubble is worth 150 such tiny experts: whole sets even for one token.
    _, fast = build(path, expert_plan(path, {0: 0, 2: 0, 3: 0}, "auto"))
    fast.experts.begin_step(1)
    assert fast.experts.full == [True, True, True]


@pytest.mark.parametrize("mode, fail_layer", [("routed", 3), ("full", 3), ("routed", 1), ("full", 0)])
def test_interrupted_forward_then_normal_forward(paths, reference, mode, fail_layer):
    path = paths["qwen2"]
    backend = FailOnce()
    model, layers = build(path, expert_plan(path, {0: 0, 2: 3, 3: 0}, mode), attention=backend)
    runner = Runner(model, PROMPTS)
    pre_r, dec_r, _ = reference["qwen2"][None]
    pre, _ = runner.prefill()
    assert torch.equal(pre, pre_r)
    nxt = pre.argmax(-1).tolist()
    backend.arm(fail_layer)
    with pytest.raises(RuntimeError, match="injected failure"):
        runner.decode_step(nxt)
    for s in runner.seqs:  # undo the step's token so it can be retried
        s.pop()
    for step in range(4):
        logits = runner.decode_step(nxt)
        assert torch.equal(logits, dec_r[step]), f"decode step {step}"
        nxt = logits.argmax(-1).tolist()
