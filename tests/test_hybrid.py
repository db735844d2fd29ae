"""Split execution of offloaded layers (host share + streamed GPU share) against the resident model,
for host shares 0, all and several between, through prefill, decode and chunked prefill; and greedy
text on the demo model with --hybrid on equal to --hybrid off."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aioffload.attention.backends import SdpaBackend
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.cli import DEMO_MODEL
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
from aioffload.engine.async_engine import Engine
from aioffload.offload.split_layout import SplitWeights, split_layout
from aioffload.offload.split_mlp import HostCompute, SplitMlp
from aioffload.offload.transfer_queue import TransferQueue
from aioffload.worker.model_loader import build_model
from aioffload.worker.sampling import SamplingParams
from tests.helpers import CPU, Runner, build, one_torch_thread, write_random_checkpoint

PROMPTS = [[1, 5, 9, 33, 7, 100, 3], [1, 200, 201, 17], [1, 42] * 6]
LAYERS, CHUNK = 5, 32  # intermediate 128 -> 4 chunks


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("hybrid"), layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def reference(path):
    return {None: Runner(build(path)[0], PROMPTS).generate(4), 3: Runner(build(path)[0], PROMPTS).generate(2, chunk=3)}


@pytest.fixture(scope="module")
def host():
    h = HostCompute(64, 64, torch.float32, CPU, threads=1)
    yield h
    h.close()


def build_split(path, host, offloaded, ring=2):
    ckpt = Checkpoint.open(path)
    cfg = ckpt.model_config
    sp = split_layout(ckpt.layout, cfg.hidden_size, cfg.intermediate_size, CHUNK)
    model, layers = build_model(ckpt, torch.float32, CPU, SdpaBackend(), 512, offloaded=offloaded, ring_size=ring,
                                split=sp, host_compute=host)  # fmt: skip
    assert isinstance(layers, TransferQueue) and isinstance(model.mlp, SplitMlp)
    return model, layers


def assert_close(ours, ref):
    pre, dec, gen = ours
    pre_r, dec_r, gen_r = ref
    assert torch.allclose(pre, pre_r, rtol=1e-5, atol=1e-5), (pre - pre_r).abs().max()
    for a, b in zip(dec, dec_r, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    assert gen == gen_r


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])  # host chunks of 4: none, some, all
@pytest.mark.parametrize("chunk", [None, 3])  # whole prefill, chunked prefill
def test_split_layers_match_the_resident_model(path, reference, host, k, chunk):
    model, layers = build_split(path, host, frozenset({1, 3, 4}))
    layers.set_split(k)
    runner = Runner(model, PROMPTS)
    assert_close(runner.generate(4 if chunk is None else 2, chunk=chunk), reference[chunk])


def test_share_changes_between_steps_and_slots_top_up(path, reference, host):
    """Loads issued with a large host share, then a step that wants none: the queue tops the
    prefetched slots up and the result is unchanged."""
    model, layers = build_split(path, host, frozenset({0, 2, 3, 4}), ring=3)
    layers.set_split(4)  # the first loads (issued at construction) carry k = 0; this sets later ones
    runner = Runner(model, PROMPTS)
    pre, _ = runner.prefill()
    assert torch.allclose(pre, reference[None][0], rtol=1e-5, atol=1e-5)
    seen = []
    orig = layers.acquire

    def spy(layer):
        w = orig(layer)
        if isinstance(w, SplitWeights):
            seen.append(w.k)
        return w

    layers.acquire = spy  # type: ignore[method-assign]
    nxt = pre.argmax(-1).tolist()
    gen: list[list[int]] = [[] for _ in PROMPTS]
    _, dec_ref, gen_ref = reference[None]
    for step, k in enumerate((0, 2, 4, 1)):
        for i, t in enumerate(nxt):
            gen[i].append(t)
        layers.set_split(k)
        logits = runner.decode_step(nxt)
        assert torch.allclose(logits, dec_ref[step], rtol=1e-5, atol=1e-5)
        nxt = logits.argmax(-1).tolist()
    assert seen == [0] * 4 + [2] * 4 + [4] * 4 + [1] * 4  # every layer computed with its step's share
    assert gen == gen_ref


def test_host_share_runs_on_its_own_thread(path, host):
    model, layers = build_split(path, host, frozenset({2}))
    layers.set_split(2)
    names = []
    orig = host._job

    def spy(*args):
        import threading

        names.append(threading.current_thread().name)
        return orig(*args)

    host._job = spy  # type: ignore[method-assign]
    try:
        Runner(model, PROMPTS).prefill()
    finally:
        host._job = orig  # type: ignore[method-assign]
    assert names and all(n.startswith("aioffload-host") for n in names)


def test_chooser_learns_the_host_time_of_real_steps(path, host):
    """A host slower in real steps than at calibration: observed times shrink the chosen share."""
    from aioffload.offload.split_cost import HostRates, SplitChooser, SplitCostModel

    rates = HostRates((1, 8), (1e-4, 2e-4), (0.0, 0.0), threads=1)
    model = SplitCostModel(num_chunks=8, chunk_bytes=int(5.5e6), chunk_params=1, layer_bytes=int(50e6),
                           layer_params=1, h2d_bytes_per_s=55e9, host=rates, sync_s=0.0)  # fmt: skip
    ch = SplitChooser(model)
    k0 = ch(1)
    assert 0 < k0 <= 8
    for _ in range(30):
        ch.observe_step([(1, k0, 3 * rates.seconds(1, k0))])  # three times slower than calibrated
    assert ch.factor[1] == pytest.approx(3.0, rel=0.01)
    assert 0 < ch(1) < k0
    assert ch(8) == model.best_k(8)  # other step sizes keep their own estimate
    k8 = ch(8)
    for i in range(40):  # +-2% noise around the calibration: no flapping
        ch.observe_step([(8, k8, rates.seconds(8, k8) * (1.02 if i % 2 else 0.98))])
    assert ch(8) == k8


def test_a_step_moves_each_ratio_once_by_its_shares_median_and_rechooses_once() -> None:
    from aioffload.offload.split_cost import HostRates, SplitChooser, SplitCostModel

    rates = HostRates((1, 8), (1e-4, 2e-4), (0.0, 0.0), threads=1)
    model = SplitCostModel(num_chunks=8, chunk_bytes=int(5.5e6), chunk_params=1, layer_bytes=int(50e6),
                           layer_params=1, h2d_bytes_per_s=55e9, host=rates, sync_s=0.0)  # fmt: skip
    ch = SplitChooser(model, smoothing=0.5)
    k0 = ch(1)
    calls: list[int] = []
    rechoose = ch.rechoose
    ch.rechoose = lambda t: calls.append(t) or rechoose(t)  # type: ignore[method-assign]
    slow = [(1, k0, 3 * rates.seconds(1, k0))] * 30
    ch.observe_step(slow + [(8, 0, 1.0)])  # k = 0: no share, no choice
    assert calls == [1]
    assert ch.factor[1] == pytest.approx(2.0)  # halfway from 1 to the step's median, 3
    for _ in range(8):
        ch.observe_step(slow)
    assert ch.factor[1] == pytest.approx(3.0, rel=0.01) and 0 < ch(1) < k0


def test_a_few_slow_shares_in_a_step_do_not_move_the_ratio() -> None:
    """The H200's real steps: most shares at their calibrated time, a few at 3-4x (call 4)."""
    from aioffload.offload.split_cost import HostRates, SplitChooser, SplitCostModel

    rates = HostRates((1, 8), (1e-4, 2e-4), (0.0, 0.0), threads=1)
    model = SplitCostModel(num_chunks=8, chunk_bytes=int(5.5e6), chunk_params=1, layer_bytes=int(50e6),
                           layer_params=1, h2d_bytes_per_s=55e9, host=rates, sync_s=0.0)  # fmt: skip
    ch = SplitChooser(model)
    k0 = ch(1)
    t = rates.seconds(1, k0)
    step = [(1, k0, t * (1.02 if i % 2 else 0.98)) for i in range(21)] + [(1, k0, 3.8 * t)] * 3
    for _ in range(20):
        ch.observe_step(step)
    assert ch.factor[1] == pytest.approx(1.0, abs=0.03)
    assert ch(1) == k0


def engine_text(hybrid: str, prompts: list[str], tokens: int = 24) -> tuple[list[str], Engine]:
    cfg = EngineConfig(
        model=DEMO_MODEL, device="cpu", cache=CacheConfig(num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
        offload=OffloadConfig(cpu_offload_gb=0.006, hybrid=hybrid, host_threads=1),  # 2 of 4 layers
    )  # fmt: skip
    engine = Engine.from_config(cfg.validate())

    async def run() -> list[str]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

        async def one(i: int, p: str) -> str:
            return "".join([o.text async for o in engine.generate(p, params, f"r{i}")])

        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(run()), engine


def test_demo_model_greedy_text_identical_with_hybrid_on_and_off():
    prompts = ["The Python tutorial", "A list is", "Exceptions are raised when"]
    off, e_off = engine_text("off", prompts)
    on, e_on = engine_text("on", prompts)
    assert e_off.worker.hybrid is None and len(e_off.worker.placement.offloaded_layers) == 2  # about half
    assert e_on.worker.hybrid is not None
    ks = {e_on.worker.hybrid.chooser(t) for t in (1, 3, 16)}
    assert ks - {0}, f"the CPU calibration gave the host no share at all: {ks}"
    assert on == off
    assert all(len(t) > 20 for t in on)


def test_plan_caps_the_host_share_at_its_down_copies_and_the_memory_budget(path, monkeypatch):
    from aioffload.offload import split_cost
    from aioffload.worker import hybrid as hyb

    ckpt = Checkpoint.open(path)
    cfg = ckpt.model_config
    on = OffloadConfig(hybrid="on", host_threads=1)
    plan = hyb.plan_hybrid(on, cfg, ckpt.layout, 3, torch.float32, CPU, 25e9)
    assert plan is not None
    try:
        # This machine's memory holds copies of every chunk of the tiny model.
        assert plan.host.max_chunks == plan.cost.max_host_chunks == plan.split.num_chunks
        assert plan.chooser.largest_share <= plan.split.num_chunks
    finally:
        plan.host.close()
    # A model of four 128-wide chunks, with memory for the pinned layers and twice two chunks' copies:
    # the budget (half) holds two.
    import dataclasses

    from aioffload.model.layout import layer_layout

    wide = dataclasses.replace(cfg, intermediate_size=512)
    split = split_layout(layer_layout(wide), wide.hidden_size, wide.intermediate_size)
    per_chunk, pinned = 3 * split.chunk * split.hidden * 4, 3 * split.numel * 4  # 3 offloaded layers, fp32
    monkeypatch.setattr(split_cost, "host_memory_available", lambda: pinned + 2 * 2 * per_chunk)
    two = hyb.plan_hybrid(on, wide, layer_layout(wide), 3, torch.float32, CPU, 25e9)
    assert two is not None and two.split.num_chunks == 4
    try:
        assert two.host.max_chunks == two.cost.max_host_chunks == 2
        assert max(two.chooser(t) for t in range(1, 17)) <= 2
    finally:
        two.host.close()
    # No memory left beside the pinned layers: no room for the host's down copies, so no split.
    monkeypatch.setattr(split_cost, "host_memory_available", lambda: 3 * plan.split.numel * 4)
    assert hyb.plan_hybrid(on, cfg, ckpt.layout, 3, torch.float32, CPU, 25e9) is None
    # A tensor-parallel follower runs rank 0's shares: its copies hold every chunk, whatever the budget.
    follower = hyb.plan_hybrid(on, cfg, ckpt.layout, 3, torch.float32, CPU, 25e9, follower=True)
    assert follower is not None
    try:
        assert follower.host.max_chunks == follower.split.num_chunks
    finally:
        follower.host.close()
