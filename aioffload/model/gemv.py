"""One-row matmuls (batch-1 decode) as a Triton GEMV, for the weight shapes where it beats cuBLAS.

Measured on an H200 inside CUDA graphs (BENCHMARKS.md, fourth session, call 2), Llama-3-8B at
batch 1: cuBLAS runs the o projection (N 4096, K 4096) as a split-K kernel plus a reduce launch,
13.5 us; this kernel, every program streaming BLOCK_N output rows' whole K in float32, 11.4 us.
On the other projections cuBLAS was as fast or faster (qkv 16.0 against 17.9 us, lm_head 240
against 253). So which shapes take the GEMV is measured, not assumed: the worker times both on
the model's own weights at start-up (worker/gemv_choice.py) and `route`s the shapes where the GEMV
wins. The products accumulate in float32, as cuBLAS's do; only the summation order differs.

`linear(x, w, b)` takes the GEMV for one row of a bf16/fp16 activation whose weight shape was
routed, F.linear otherwise. SHAPES is process-wide (like torch.backends flags): empty until a
worker on CUDA routes some. Imported lazily with model/fused.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_N, BLOCK_K, WARPS, STAGES = 4, 1024, 4, 3  # the fastest of 8 configurations (fourth session, call 2)
SHAPES: frozenset[tuple[int, int]] = frozenset()  # (N, K) of the weights routed to the GEMV


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n, k, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < n
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        c_mask = cols < k
        x = tl.load(x_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=r_mask)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """x [1, K] @ w[N, K].T (+ b) -> [1, N], in x's dtype. `config`: (BLOCK_N, BLOCK_K, warps, stages)."""
    assert x.shape[0] == 1 and x.shape[1] == w.shape[1] and w.stride(1) == 1 and x.is_contiguous()
    n, k = w.shape
    bn, bk, warps, stages = config or (BLOCK_N, BLOCK_K, WARPS, STAGES)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, bn),)](x, w, b if b is not None else w, out, n, k, w.stride(0),
                                        HAS_BIAS=b is not None, BLOCK_N=bn, BLOCK_K=bk,
                                        num_warps=warps, num_stages=stages)  # fmt: skip
    return out


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV for one contiguous half-precision row when w's shape is in SHAPES."""
    if x.shape[0] == 1 and (w.shape[0], w.shape[1]) in SHAPES and x.dtype in (torch.bfloat16, torch.float16) \
            and w.dtype == x.dtype and x.is_contiguous() and w.stride(1) == 1:  # fmt: skip
        return gemv(x, w, b)
    return F.linear(x, w, b)


def route(shapes: Iterable[tuple[int, int]]) -> None:
    """Send one-row matmuls with these (N, K) weight shapes to the GEMV (worker/gemv_choice.py picks them)."""
    global SHAPES
    SHAPES = frozenset(shapes)
