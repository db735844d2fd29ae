"""The one-row GEMV (model/gemv.py) against F.linear: under the Triton interpreter in a child
process (tests/paged_cases.py), and compiled on a GPU (`gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.paged_cases import INTERPRETED, gpu_only, interpreter, needs_interpreter, run_interpreter_child


@pytest.fixture
def interpreted():
    from aioffload.model import gemv

    with interpreter():
        yield gemv


# (N, K, bias, dtype, config): N and K not multiples of the blocks; bias (Qwen2's qkv) on and off.
CASES = [
    (48, 64, False, torch.float32, (16, 32, 4, 1)),
    (37, 100, True, torch.float32, (16, 32, 4, 1)),
    (40, 96, True, torch.bfloat16, (8, 64, 4, 1)),
    (33, 70, False, torch.float16, (16, 32, 4, 1)),
]


@needs_interpreter
@pytest.mark.parametrize("n, k, bias, dtype, config", CASES)
def test_interpreted_gemv_matches_linear(interpreted, n, k, bias, dtype, config):
    g = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(1, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = interpreted.gemv(x, w, b, config)
    want = F.linear(x.float(), w.float(), b.float() if bias else None)  # float32 sums of the same values
    assert got.shape == (1, n) and got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # one rounding of |y| <~ 20
    assert (got.float() - want).abs().max().item() < tol


@needs_interpreter
def test_interpreted_linear_routes_one_half_precision_row_of_a_chosen_shape(interpreted):
    """linear takes the GEMV for one bf16 row of a weight shape in SHAPES, F.linear for more rows,
    float32, or another shape."""
    g = torch.Generator().manual_seed(1)
    w, other = torch.randn(32, 64, generator=g).to(torch.bfloat16), torch.randn(16, 64, generator=g).to(torch.bfloat16)
    calls = []
    real, saved = interpreted.gemv, interpreted.SHAPES
    interpreted.gemv = lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
    interpreted.route([(32, 64)])
    try:
        one = interpreted.linear(torch.randn(1, 64, generator=g).to(torch.bfloat16), w)
        interpreted.linear(torch.randn(2, 64, generator=g).to(torch.bfloat16), w)
        interpreted.linear(torch.randn(1, 64, generator=g), w.float())
        interpreted.linear(torch.randn(1, 64, generator=g).to(torch.bfloat16), other)
    finally:
        interpreted.gemv, interpreted.SHAPES = real, saved
    assert calls == [(32, 64)] and one.shape == (1, 32)


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases():
    pytest.importorskip("triton", reason="triton is not importable; the GEMV needs it")
    run_interpreter_child(__file__, len(CASES) + 1)


@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
@gpu_only
def test_cuda_gemv_matches_cublas_bf16(n, k):
    from aioffload.model import gemv

    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(n)
    x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=dev, generator=g) * k**-0.5).to(torch.bfloat16)
    exact = F.linear(x.float(), w.float())
    got, cublas = gemv.gemv(x, w), F.linear(x, w)
    # bf16 output: half an ulp of |y| <~ 5 is 1.6e-2; both round the same float32 sum (orders differ).
    assert (got.float() - exact).abs().max().item() < 2e-2
    assert (got.float() - cublas.float()).abs().max().item() < 4e-2
