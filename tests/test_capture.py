"""worker/capture.py: the collector is off while graphs are captured, and back as it was after;
capture_graphs warms each key up once, captures it, and its replays follow the inputs."""

from __future__ import annotations

import gc

import pytest
import torch

from aioffload.worker.capture import capture_graphs, no_gc


def test_no_gc_turns_the_collector_off_and_restores_it() -> None:
    assert gc.isenabled()
    with no_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_gc():  # a failed capture restores it too
        raise RuntimeError("capture failed")
    assert gc.isenabled()


def test_no_gc_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with no_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_capture_graphs_warms_up_captures_in_order_and_replays_new_inputs() -> None:
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    calls: list[tuple[int, bool]] = []

    def forward(n: int) -> torch.Tensor:
        calls.append((n, gc.isenabled()))
        return x[:n] * 2

    graphs, outputs = capture_graphs([8, 4, 2], forward)
    assert calls == [(8, False), (8, False), (4, False), (4, False), (2, False), (2, False)] and gc.isenabled()
    assert list(graphs) == [8, 4, 2] and outputs[4].shape == (4,)
    x.copy_(torch.full((8,), 5.0, device="cuda"))
    graphs[4].replay()
    torch.cuda.synchronize()
    assert outputs[4].tolist() == [10.0] * 4  # (the graphs share a pool: only the replayed output is defined)
