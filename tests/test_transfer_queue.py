"""The transfer queue: offloaded forwards are bit-identical to resident ones, the ring streams
layers in forward order across steps, and an interrupted forward recovers."""

from __future__ import annotations

import pytest
import torch

from aioffload.offload.transfer_queue import ResidentLayers, TransferQueue
from tests.helpers import FailOnce, Runner, build, one_torch_thread, write_random_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield

PROMPTS = [[1, 5, 9, 33, 7, 100, 3], [1, 200, 201, 17], [1, 42] * 6]
LAYERS = 6


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tq"), layers=LAYERS, seed=1)


@pytest.fixture(scope="module")
def reference(path):
    """All-resident results: whole prefill + 4 decode steps, and chunked prefill + 2 decode steps."""
    model, layers = build(path)
    assert isinstance(layers, ResidentLayers)
    return {
        None: Runner(model, PROMPTS).generate(4),
        3: Runner(build(path)[0], PROMPTS).generate(2, chunk=3),
    }


def assert_same(ours, ref):
    pre, dec, gen = ours
    pre_r, dec_r, gen_r = ref
    assert torch.equal(pre, pre_r)
    assert len(dec) == len(dec_r)
    for step, (a, b) in enumerate(zip(dec, dec_r, strict=True)):
        assert torch.equal(a, b), f"decode step {step}: max abs diff {(a - b).abs().max().item()}"
    assert gen == gen_r


OFFLOAD_CASES = [
    (frozenset({3, 4, 5}), 1),
    (frozenset({3, 4, 5}), 2),
    (frozenset({3, 4, 5}), 3),
    (frozenset({0, 1, 2}), 2),
    (frozenset({1, 3}), 1),
    (frozenset({1, 3}), 2),
    (frozenset({0, 2, 5}), 3),
    (frozenset({4}), 2),  # one offloaded layer: the ring shrinks to 1
    (frozenset(range(LAYERS)), 3),  # everything offloaded
]


@pytest.mark.parametrize("offloaded, ring", OFFLOAD_CASES)
def test_offloaded_prefill_and_decode_bit_identical(path, reference, offloaded, ring):
    model, layers = build(path, offloaded=offloaded, ring=ring)
    assert isinstance(layers, TransferQueue)
    assert layers.ring_size == min(ring, len(offloaded))
    assert_same(Runner(model, PROMPTS).generate(4), reference[None])


@pytest.mark.parametrize(
    "offloaded, ring", [(frozenset({3, 4, 5}), 3), (frozenset({1, 3}), 1), (frozenset({0, 2, 5}), 2)]
)
def test_offloaded_chunked_prefill_bit_identical(path, reference, offloaded, ring):
    model, _ = build(path, offloaded=offloaded, ring=ring)
    assert_same(Runner(model, PROMPTS).generate(2, chunk=3), reference[3])


def test_queue_holds_exactly_the_offloaded_layers(path):
    model, tq = build(path, offloaded=frozenset({4, 1}), ring=5)
    assert isinstance(tq, TransferQueue)
    assert tq.order == [1, 4] and sorted(tq.host) == [1, 4] and sorted(tq.resident) == [0, 2, 3, 5]
    assert tq.ring_size == 2  # never more slots than offloaded layers
    numel = tq.host[1].numel()
    assert all(s.numel() == numel and s.dtype == torch.float32 for s in tq.slots)
    assert tq.bytes_per_step == 2 * numel * 4
    assert build(path, offloaded=frozenset({1, 4}), ring=0)[1].ring_size == 1


# ---- ring order ----


class Recorder:
    """Wraps TransferQueue._enqueue and .acquire to log every copy and check every hand-out."""

    def __init__(self, monkeypatch):
        self.copies: list[tuple[int, int]] = []  # (layer, slot) per copy, in issue order
        self.acquired: list[tuple[int, int]] = []  # (layer, slot) per offloaded acquire
        enqueue, acquire = TransferQueue._enqueue, TransferQueue.acquire
        rec = self

        def _enqueue(self):
            j = self._next_load
            slot, layer = j % self.ring_size, self.order[j % len(self.order)]
            enqueue(self)
            assert torch.equal(self.slots[slot], self.host[layer])  # the copy really happened
            rec.copies.append((layer, slot))

        def _acquire(self, layer):
            w = acquire(self, layer)
            if layer in self.host:
                slot = next(k for k, v in enumerate(self.views) if v is w)
                assert torch.equal(w.flat, self.host[layer]), f"slot {slot} does not hold layer {layer}"
                assert w.flat.data_ptr() == self.slots[slot].data_ptr()
                rec.acquired.append((layer, slot))
            return w

        monkeypatch.setattr(TransferQueue, "_enqueue", _enqueue)
        monkeypatch.setattr(TransferQueue, "acquire", _acquire)


@pytest.mark.parametrize("ring", [1, 2, 3])
def test_ring_order_over_three_steps(path, monkeypatch, ring):
    offloaded = [1, 3, 4]
    rec = Recorder(monkeypatch)
    model, tq = build(path, offloaded=frozenset(offloaded), ring=ring)
    assert rec.copies == [(offloaded[j], j % ring) for j in range(ring)]  # primed at construction
    runner = Runner(model, PROMPTS[:2])
    pre, _ = runner.prefill()
    runner.decode_step(pre.argmax(-1).tolist())
    runner.decode_step([7, 9])
    o = len(offloaded)
    assert rec.copies == [(offloaded[j % o], j % ring) for j in range(3 * o + ring)]
    assert rec.acquired == [(offloaded[j % o], j % ring) for j in range(3 * o)]


@pytest.mark.parametrize("ring", [1, 2, 3])
def test_ring_streams_across_step_boundaries(path, monkeypatch, ring):
    offloaded = [0, 2, 5]
    rec = Recorder(monkeypatch)
    model, tq = build(path, offloaded=frozenset(offloaded), ring=ring)
    runner = Runner(model, PROMPTS[:1])
    nxt = runner.prefill()[0].argmax(-1).tolist()
    for step in range(1, 3):
        # Right after step `step` ends, the first `ring` offloaded layers of the next step are in the slots.
        o = len(offloaded)
        assert rec.copies[-ring:] == [(offloaded[t], (step * o + t) % ring) for t in range(ring)]
        assert len(rec.copies) == step * o + ring
        for t in range(ring):
            assert torch.equal(tq.slots[(step * o + t) % ring], tq.host[offloaded[t]])
        nxt = runner.decode_step(nxt).argmax(-1).tolist()


# ---- interrupted forward ----


@pytest.mark.parametrize(
    "offloaded, ring, when",
    [
        (frozenset({1, 3}), 2, "prefill"),  # layer 2 resident, between two offloaded ones
        (frozenset({2, 3, 4}), 2, "prefill"),  # layer 2 is the first offloaded one
        (frozenset({0, 2, 5}), 1, "decode"),
        (frozenset({0, 1, 3}), 3, "decode"),
        (frozenset({0, 1}), 2, "decode"),  # fails after every offloaded layer ran
    ],
)
def test_interrupted_forward_then_normal_forward(path, reference, offloaded, ring, when):
    backend = FailOnce()
    model, tq = build(path, offloaded=offloaded, ring=ring, attention=backend)
    runner = Runner(model, PROMPTS)
    pre_r, dec_r, _ = reference[None]
    if when == "prefill":
        backend.arm(2)
        with pytest.raises(RuntimeError, match="injected failure"):
            runner.prefill_step()
        assert runner.done == [0, 0, 0]  # the step did not commit
    pre, _ = runner.prefill()  # the same step again: same tokens, same KV slots
    assert torch.equal(pre, pre_r)
    nxt = pre.argmax(-1).tolist()
    if when == "decode":
        backend.arm(2)
        with pytest.raises(RuntimeError, match="injected failure"):
            runner.decode_step(nxt)
        for s in runner.seqs:  # undo the step's token so it can be retried
            s.pop()
    for step in range(4):
        logits = runner.decode_step(nxt)
        assert torch.equal(logits, dec_r[step]), f"decode step {step}"
        nxt = logits.argmax(-1).tolist()


def test_reset_reprimes_at_the_given_layer(path):
    _, tq = build(path, offloaded=frozenset({1, 3, 4}), ring=2)
    tq.reset(3)
    assert torch.equal(tq.acquire(3).flat, tq.host[3])
    tq.release(3)
    assert torch.equal(tq.acquire(4).flat, tq.host[4])
    tq.release(4)
    assert torch.equal(tq.acquire(1).flat, tq.host[1])


def test_out_of_order_acquire_reprimes_and_warns(path, caplog):
    _, tq = build(path, offloaded=frozenset({1, 3, 4}), ring=2)
    with caplog.at_level("WARNING", logger="aioffload.transfer_queue"):
        w = tq.acquire(4)
    assert torch.equal(w.flat, tq.host[4])
    assert "expected layer 1, got 4" in caplog.text


# ---- resident layers ----


def test_resident_layers_pass_through(path):
    model, layers = build(path)
    assert isinstance(layers, ResidentLayers)
    assert sorted(layers.resident) == list(range(LAYERS))
    before = dict(layers.resident)
    for i in range(LAYERS):
        w = layers.acquire(i)
        assert w is layers.resident[i]
        assert w is layers.acquire(i)  # no copies, no state
        layers.release(i)
    layers.release(3)  # release without acquire is harmless
    assert layers.resident == before and all(layers.resident[i] is before[i] for i in before)
    ptrs = {i: w.flat.data_ptr() for i, w in before.items()}
    Runner(model, PROMPTS[:1]).generate(1)
    assert {i: w.flat.data_ptr() for i, w in layers.resident.items()} == ptrs
