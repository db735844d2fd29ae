"""One-row matmuls (batch-1 decode) as a Triton GEMV, where cuBLAS leaves SMs idle.

Measured on an H200 (BENCHMARKS.md, fourth session, call 1), Llama-3-8B at batch 1 inside the
decode graph: cuBLAS runs the qkv projection (N 6144, K 4096) as 96 tiles of 64 output rows, so 96
of the 132 SMs read its weight: 3.0 TB/s against the ~4.1 the large projections reach; the o
projection takes a split-K kernel plus a separate reduce launch. Here every program owns
BLOCK_N output rows and streams their whole K, so N / BLOCK_N programs (384 for qkv) fill the
machine, one launch, no reduce. The products accumulate in float32, as cuBLAS's do; only the
summation order differs.

`linear(x, w, b)` takes this path for one row of a bf16/fp16 activation on CUDA and falls back to
F.linear otherwise (and everywhere when MAX_ROWS is 0). Imported lazily with model/fused.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 1  # activations of at most this many rows take the GEMV (0: never)
BLOCK_N, BLOCK_K, WARPS, STAGES = 16, 512, 4, 3  # the launch config (fourth session, call 2 chose it)


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
    """F.linear, through the GEMV for up to MAX_ROWS rows of a contiguous half-precision x."""
    if 0 < x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous() \
            and w.dtype == x.dtype and w.stride(1) == 1:  # fmt: skip
        return gemv(x, w, b)
    return F.linear(x, w, b)
