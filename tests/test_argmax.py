"""Greedy ids through worker/argmax.py's two kernels: each row's first maximal index, as
torch.argmax; under the Triton interpreter in a child process (tests/paged_cases.py), and compiled
on a GPU (`gpu`)."""

from __future__ import annotations

import pytest
import torch

from tests.paged_cases import INTERPRETED, gpu_only, interpreter, needs_interpreter, run_interpreter_child


def rows_with_ties(v: int, block: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(v)
    x = torch.randn(5, v, generator=g)
    x[0, 3] = x[0, v - 1] = 50.0  # a tie across blocks: the first wins
    x[1, block + 7] = x[1, block + 9] = 50.0  # a tie inside one block
    x[2] = float("-inf")  # nothing finite: index 0, as torch
    x[2, v - 1] = -1e30
    x[3, v - 1] = 60.0  # the last entry, in the partial last block
    x[4, 2 * block] = float("inf")
    return x


@pytest.fixture
def interpreted():
    from aioffload.worker import argmax

    with interpreter():
        saved = argmax.BLOCK
        argmax.BLOCK = 64  # several blocks on a small vocabulary
        yield argmax
        argmax.BLOCK = saved


@needs_interpreter
@pytest.mark.parametrize("v", [64 * 3, 64 * 3 + 17])
def test_interpreted_argmax_is_the_first_maximal_index(interpreted, v):
    x = rows_with_ties(v, 64)
    got = interpreted.argmax_kernels(x)
    assert got.dtype == torch.int64 and got.tolist() == x.argmax(dim=-1).tolist()
    assert got.tolist()[:2] == [3, 64 + 7]


def test_argmax_rows_falls_back_to_torch_off_cuda():
    pytest.importorskip("triton", reason="worker/argmax.py imports triton")
    from aioffload.worker.argmax import argmax_rows

    x = rows_with_ties(300, 64)
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases():
    pytest.importorskip("triton", reason="triton is not importable; the argmax kernels need it")
    run_interpreter_child(__file__, 2)


@gpu_only
def test_cuda_argmax_equals_torch():
    from aioffload.worker.argmax import argmax_rows

    x = rows_with_ties(128256, 4096).cuda()
    many = torch.randn(64, 128256, device="cuda")
    assert argmax_rows(x).tolist() == x.argmax(dim=-1).tolist()
    assert torch.equal(argmax_rows(many), many.argmax(dim=-1))
