"""Triton paged attention: every query row walks its sequence's block table.

One program per (query row, KV head) handles the whole GQA group of that head, with an
online softmax over BLOCK_N keys at a time. Prefill chunks and decode tokens are the
same thing here: a row sees `row_ctx` keys of sequence `row_seq`. Imported lazily (CUDA
only); tests run it on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, row_seq_ptr, row_ctx_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(row_seq_ptr + row)
    ctx = tl.load(row_ctx_ptr + row)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for start in range(0, ctx, BLOCK_N):
        t = start + offs_n
        valid = t < ctx
        blk = tl.load(bt_ptr + seq * stride_bt + t // BLOCK_SIZE, mask=valid, other=0)
        base = blk.to(tl.int64) * stride_kb + (t % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [G, N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=g_mask[:, None],
    )


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, B] int32
    row_seq: torch.Tensor,  # [T] int32
    row_ctx: torch.Tensor,  # [T] int32, >= 1
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    t, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    _paged_attn_kernel[(t, hkv)](
        q, k_cache, v_cache, out, block_tables, row_seq, row_ctx,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_SIZE=block_size, BLOCK_N=64,
    )  # fmt: skip
    return out
