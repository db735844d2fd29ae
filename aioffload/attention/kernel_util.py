"""Pieces shared by the Triton attention kernels. Imported lazily (it imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are kept in log2 units: exp2 is the cheap exponential


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr):
    """tl.dot, or the same product on float32 copies of a and b. Triton 3.6's interpreter
    multiplies bfloat16 operands as raw integers (numpy has no bfloat16), so CPU runs upcast
    first; the values are the same bfloat16 numbers, and float32 accumulation is what the
    tensor cores do, so the result matches the compiled kernel's."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b)
    return out


def dot_f32(t: torch.Tensor) -> bool:
    """Whether kernels reading `t` must upcast before tl.dot (bfloat16 under the interpreter)."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def splits_for(programs: int, num_sms: int, most: int) -> int:
    """Splits of each program's keys so that programs x splits make ~2 waves over the SMs: a
    power of two, at most `most`; 1 once `programs` alone fill the machine."""
    want = 2 * num_sms // max(1, programs)
    return 1 if want < 2 else min(most, 1 << (want.bit_length() - 1))
