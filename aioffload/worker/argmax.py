"""Greedy token ids: the argmax of each logits row, in two short Triton launches on CUDA.

torch's argmax over one 128k-entry row is a single reduction kernel that took 28-36 us of a 4.8 ms
batch-1 decode step on an H200 (BENCHMARKS.md, third and fourth sessions). Here `_block_max` gives
each (row, block of BLOCK entries) program its block's maximum and first index, and `_pick` takes,
per row, the largest block maximum, the first block among equal ones: the row's first maximal
index, as torch.argmax returns. A NaN counts as +inf (torch.argmax picks a NaN over everything;
the two differ only for a row holding both a NaN and an earlier +inf).

`argmax_rows(logits)` runs the kernels (`argmax_kernels`) for a float32 [R, V] CUDA tensor with
unit column stride, torch.argmax otherwise. Imported lazily (triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _block_max(x_ptr, val_ptr, idx_ptr, v, stride_x, num_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < v, other=float("-inf"))
    x = tl.where(x != x, float("inf"), x)  # NaN -> +inf
    m = tl.max(x, axis=0)
    first = tl.min(tl.where(x == m, offs, v), axis=0)  # the first index holding the maximum
    tl.store(val_ptr + row * num_blocks + blk, m)
    tl.store(idx_ptr + row * num_blocks + blk, first)


@triton.jit
def _pick(val_ptr, idx_ptr, out_ptr, num_blocks, BLOCKS_P2: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCKS_P2)
    mask = offs < num_blocks
    vals = tl.load(val_ptr + row * num_blocks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_blocks + offs, mask=mask, other=2147483647)
    m = tl.max(vals, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(vals == m, idx, 2147483647), axis=0).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] int64: each row's first maximal index."""
    if logits.device.type != "cuda" or logits.dtype != torch.float32 or logits.dim() != 2 \
            or logits.stride(1) != 1 or logits.shape[1] >= 2**31:  # fmt: skip
        return logits.argmax(dim=-1)
    return argmax_kernels(logits)


def argmax_kernels(logits: torch.Tensor) -> torch.Tensor:
    """argmax_rows through the two kernels, on any device Triton runs on (the interpreter in tests)."""
    r, v = logits.shape
    nb = triton.cdiv(v, BLOCK)
    vals = torch.empty(r, nb, dtype=torch.float32, device=logits.device)
    idx = torch.empty(r, nb, dtype=torch.int32, device=logits.device)
    out = torch.empty(r, dtype=torch.int64, device=logits.device)
    if r:
        _block_max[(r, nb)](logits, vals, idx, v, logits.stride(0), nb, BLOCK=BLOCK, num_warps=8)
        _pick[(r,)](vals, idx, out, nb, BLOCKS_P2=triton.next_power_of_2(nb))
    return out
