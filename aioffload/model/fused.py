"""Fused elementwise kernels for the CUDA decoder path (Triton; imported lazily).

A batch-1 decode step is a chain of GEMVs; between them, plain PyTorch launches ~30
tiny kernels per layer (norm, rope, cache writes, SiLU), which cost 2.1 ms of an 8 ms
step on an H100 even inside a CUDA graph (BENCHMARKS.md). These three kernels replace
them: residual add + RMSNorm, q/k norm + rope + KV-cache write, and SiLU x up. `linear` is
model/gemv.py's (a Triton GEMV for one-row activations, F.linear otherwise).
Arithmetic follows the HF order (norm in float32, cast, then scale) so bf16 results
stay within rounding of the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aioffload.model.gemv import linear  # noqa: F401  (the ops module's linear: a GEMV for one row)

ROPE_BLOCK_T = 16  # tokens per rope program in chunks of at least 4x this many


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * n + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the residual add rounds, as in HF
        tl.store(x_ptr + row * n + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * n + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += residual (in place, when given); returns rms_norm(x) * weight. x: [T, H]."""
    t, n = x.shape
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, weight, out, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["t_total"])  # one variant for every row count (eager steps vary it)
def _rope_cache_kernel(
    qkv_ptr, pos_ptr, rope_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, qn_ptr, kn_ptr,
    t_total, eps, stride_qkv, stride_qo_t, stride_qo_h, stride_cache_slot, stride_cache_h,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """One head of BLOCK_T tokens per program (a 32k-token chunk: 512 x 40 programs, not 32768 x 40
    programs of 128 elements each, which ran at ~0.9 TB/s on an H200)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < t_total
    h = tl.program_id(1)  # 0..NUM_Q-1: query heads; then NUM_KV key heads
    offs = tl.arange(0, HEAD_DIM // 2)
    m2 = t_mask[:, None]
    pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0)
    rope_row = rope_ptr + pos[:, None] * 2 * HEAD_DIM + offs[None, :]  # rope: [P, 2, D], halves are equal
    cos = tl.load(rope_row, mask=m2, other=0.0).to(tl.float32)
    sin = tl.load(rope_row + HEAD_DIM, mask=m2, other=0.0).to(tl.float32)
    base = qkv_ptr + offs_t.to(tl.int64)[:, None] * stride_qkv + h * HEAD_DIM + offs[None, :]
    x1 = tl.load(base, mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(base + HEAD_DIM // 2, mask=m2, other=0.0).to(tl.float32)
    if QK_NORM:
        # q heads take q_norm's weight, k heads k_norm's: two masked loads, no pointer select.
        is_q = (offs * 0 + h) < NUM_Q  # a per-element mask: Triton wants vector masks
        is_k = (offs * 0 + h) >= NUM_Q
        w1 = tl.load(qn_ptr + offs, mask=is_q, other=0.0) + tl.load(kn_ptr + offs, mask=is_k, other=0.0)
        w2 = tl.load(qn_ptr + HEAD_DIM // 2 + offs, mask=is_q, other=0.0) + tl.load(
            kn_ptr + HEAD_DIM // 2 + offs, mask=is_k, other=0.0
        )
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)  # [BLOCK_T]
        dt = qkv_ptr.dtype.element_ty
        x1 = (x1 * rstd[:, None]).to(dt).to(tl.float32) * w1.to(tl.float32)[None, :]
        x2 = (x2 * rstd[:, None]).to(dt).to(tl.float32) * w2.to(tl.float32)[None, :]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if h < NUM_Q:
        dst = q_out_ptr + offs_t.to(tl.int64)[:, None] * stride_qo_t + h * stride_qo_h + offs[None, :]
        tl.store(dst, o1.to(q_out_ptr.dtype.element_ty), mask=m2)
        tl.store(dst + HEAD_DIM // 2, o2.to(q_out_ptr.dtype.element_ty), mask=m2)
    else:
        slot = tl.load(slot_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
        kh = h - NUM_Q
        dst = k_cache_ptr + slot[:, None] * stride_cache_slot + kh * stride_cache_h + offs[None, :]
        tl.store(dst, o1.to(k_cache_ptr.dtype.element_ty), mask=m2)
        tl.store(dst + HEAD_DIM // 2, o2.to(k_cache_ptr.dtype.element_ty), mask=m2)
        vsrc = qkv_ptr + offs_t.to(tl.int64)[:, None] * stride_qkv + (NUM_Q + NUM_KV + kh) * HEAD_DIM + offs[None, :]
        vdst = v_cache_ptr + slot[:, None] * stride_cache_slot + kh * stride_cache_h + offs[None, :]
        tl.store(vdst, tl.load(vsrc, mask=m2), mask=m2)
        tl.store(vdst + HEAD_DIM // 2, tl.load(vsrc + HEAD_DIM // 2, mask=m2), mask=m2)


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D]
    positions: torch.Tensor,  # [T] int64
    rope: torch.Tensor,  # [P, 2, D]
    slot_mapping: torch.Tensor,  # [T] int64
    k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:  # q after (norm and) rope: [T, Hq, D]
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    block_t = ROPE_BLOCK_T if t >= 4 * ROPE_BLOCK_T else 1  # decode rows and short chunks: one token a program
    _rope_cache_kernel[(triton.cdiv(t, block_t), num_heads + num_kv_heads)](
        qkv, positions, rope, slot_mapping, q, k_cache, v_cache,
        q_norm if q_norm is not None else qkv, k_norm if k_norm is not None else qkv,
        t, eps, qkv.stride(0), q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_Q=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, QK_NORM=q_norm is not None, BLOCK_T=block_t,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gu_ptr + t * 2 * inter + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * 2 * inter + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds, then the mul
    tl.store(out_ptr + t * inter + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up, [T, I]."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out
