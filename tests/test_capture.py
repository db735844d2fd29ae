"""worker/capture.py: the collector is off while graphs are captured, and back as it was after."""

from __future__ import annotations

import gc

import pytest

from aioffload.worker.capture import no_gc


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
