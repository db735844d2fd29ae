"""Long prefill chunks through cuDNN's fused attention (issue 14: the 32k prompt).

Measured on the H200 (BENCHMARKS.md, third session, call 1), Llama-3-8B heads at 32k: cuDNN's
attention (SDPA's CUDNN backend) runs at 660-690 TFLOP/s, our Triton tile kernel at 300-390,
FlashAttention-2 (SDPA's flash backend) at ~350. So an eager step hands each chunk of at least
`DENSE_MIN_ROWS` query rows to cuDNN; smaller chunks, decode rows and everything inside a CUDA
graph stay on the Triton kernels (a chunk's key count changes every step; a graph's cannot).

A chunk of n rows at positions start .. start + n - 1 sees keys 0 .. its own position. cuDNN's
causal mask is top-left aligned, so a chunk after a cached prefix is two calls whose results
merge through their log-sum-exps: the queries against the prefix [0, start) with no mask, and
against the chunk's own keys [start, start + n) with the causal mask. The keys come out of the
paged cache in position order (one gather per sequence; the rope op has already written the
chunk's own K/V there).

`lse_attention` is the attention call (q [1, Hq, n, D], k/v [1, Hkv, L, D]) -> (out [1, Hq, n, D],
natural-log LSE [1, Hq, n] float32): `cudnn_lse_attention` on CUDA, `math_lse_attention` (plain
PyTorch) where tests check the gather/split/merge logic on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("aioffload.attention")

DENSE_MIN_ROWS = 1024  # query rows from which a chunk goes to cuDNN (per-sequence calls cost ~10 launches a layer)

LseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]


def math_lse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float32 scores, top-left causal mask, GQA by repeating K/V over the group."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1).float(), v.repeat_interleave(g, dim=1).float()
    s = q.float() @ k.transpose(-1, -2) * scale  # [1, Hq, n, L]
    if causal:
        n, length = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, length, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [1, Hq, n]
    return (torch.exp(s - lse[..., None]) @ v).to(q.dtype), lse


def cudnn_lse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention with its log-sum-exp (SDPA's CUDNN backend, called directly for the LSE)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1].reshape(q.shape[0], q.shape[1], q.shape[2]).float()


def gather_positions(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[1, Hkv, length, D] view of one sequence's keys (or values) 0 .. length - 1, in position order."""
    bs = cache.shape[1]
    nb = -(-length // bs)
    return cache[block_table[:nb].long()].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)


def attend_dense(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, B] int32
    seqs: Sequence[tuple[int, int, int, int]],  # (sequence, first row, rows, first position)
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]: these rows are written
    lse_attention: LseAttention,
) -> torch.Tensor:
    for seq, row0, n, start in seqs:
        qs = q[row0 : row0 + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ks = gather_positions(k_cache, block_tables[seq], start + n)  # [1, Hkv, start + n, D]
        vs = gather_positions(v_cache, block_tables[seq], start + n)
        own, lse_own = lse_attention(qs, ks[:, :, start:], vs[:, :, start:], True, scale)
        if start == 0:
            o = own
        else:
            pre, lse_pre = lse_attention(qs, ks[:, :, :start], vs[:, :, :start], False, scale)
            lse = torch.logaddexp(lse_pre, lse_own)  # [1, Hq, n]
            o = pre.float() * torch.exp(lse_pre - lse)[..., None] + own.float() * torch.exp(lse_own - lse)[..., None]
        out[row0 : row0 + n] = o[0].transpose(0, 1)
    return out


def probe_cudnn(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when cuDNN's attention gives this machine the reference's answer on a small GQA chunk
    after a prefix (the merge included), else why it cannot be used."""
    if device.type != "cuda":
        return "not a CUDA device"
    try:
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(96, 8, 128, device=device, dtype=dtype, generator=g)  # [T, Hq, D]: 32 prefix rows unused
        k_cache = torch.randn(9, 16, 2, 128, device=device, dtype=dtype, generator=g)
        v_cache = torch.randn_like(k_cache)
        table = torch.tensor([[3, 1, 4, 0, 5, 2, 7, 6]], dtype=torch.int32, device=device)
        seqs = [(0, 32, 64, 64)]  # 64 rows at positions 64 .. 127 after a 64-token prefix
        got = attend_dense(q, k_cache, v_cache, table, seqs, 128**-0.5, torch.zeros_like(q), cudnn_lse_attention)
        want = attend_dense(q, k_cache, v_cache, table, seqs, 128**-0.5, torch.zeros_like(q), math_lse_attention)
        err = (got[32:].float() - want[32:].float()).abs().max().item()
    except Exception as e:  # no cuDNN attention for this card, dtype or build
        return f"cuDNN attention failed: {str(e).splitlines()[0][:200]}"
    if not err < 0.05:
        return f"cuDNN attention disagrees with the reference (max error {err:.3g})"
    return None
