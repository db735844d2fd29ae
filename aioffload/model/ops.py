"""The decoder's elementwise ops in plain PyTorch, with Hugging Face's arithmetic, and its matmul.

`model/fused.py` implements the same three ops (`add_rms_norm`, `rope_and_cache`,
`silu_mul`) as Triton kernels for CUDA, and `linear` as a GEMV for one-row activations;
`LlamaModel` runs one layer structure over either module, so the CPU path in CI checks the composition the GPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aioffload.attention.backends import write_kv

linear = F.linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF: normalise in float32, cast back, then scale.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D]
    return x * cos + _rotate_half(x) * sin


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += residual (in place, when given); returns rms_norm(x) * weight. x: [T, H]."""
    if residual is not None:
        x.add_(residual)
    return rms_norm(x, weight, eps)


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
    """Split qkv, q/k-norm (Qwen3), rope q and k, write k and v into the cache; return q."""
    t = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(t, num_heads, head_dim)
    k = k.view(t, num_kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    cos_sin = rope[positions]  # [T, 2, D]
    cos, sin = cos_sin[:, 0:1], cos_sin[:, 1:2]  # [T, 1, D]
    write_kv(apply_rope(k, cos, sin), v.reshape(t, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping)
    return apply_rope(q, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up, [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
