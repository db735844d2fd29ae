"""Long fresh prefill chunks through cuDNN's fused attention (issue 14: the 32k prompt).

Measured on the H200 (BENCHMARKS.md, third session, calls 1-2), Llama-3-8B heads at 32k: cuDNN's
attention (SDPA's CUDNN backend) runs at 650-690 TFLOP/s, our Triton tile kernel at 300-390,
FlashAttention-2 (SDPA's flash backend) at ~350. But cuDNN builds an execution plan for every new
shape, ~15 ms each: with the chunk's key count changing every step, a cold 32k prompt in 2048-token
chunks took 1780 ms against 1312 ms warm (call 2). So only a fresh chunk (no cached prefix) of at
least `DENSE_MIN_ROWS` rows goes to cuDNN, padded to a multiple of `DENSE_PAD` rows (zero rows
behind the real ones: under the causal mask no real row sees them), so the shapes are few and
`warm` builds their plans at start-up. Chunks after a cached prefix, smaller chunks, decode rows
and everything inside a CUDA graph stay on the Triton kernels.

`attend_dense` also takes a chunk after a cached prefix (two calls merged through their
log-sum-exps: the prefix without a mask, the chunk's own keys with the causal mask); the step
inputs route none there (worker/inputs.py), and the CPU tests check that logic. The keys come out
of the paged cache in position order (the rope op has already written the chunk's own K/V there).

`lse_attention` is the attention call (q [1, Hq, n, D], k/v [1, Hkv, L, D]) -> (out [1, Hq, n, D],
natural-log LSE [1, Hq, n] float32): `cudnn_lse_attention` on CUDA, `math_lse_attention` (plain
PyTorch) where tests check the gather/pad/split/merge logic on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("aioffload.attention")

DENSE_MIN_ROWS = 1024  # rows from which a fresh chunk goes to cuDNN (per-sequence calls cost ~10 launches a layer)
DENSE_PAD = 1024  # fresh chunks are padded to a multiple of this many rows: one cuDNN plan per multiple

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
    pad: int = DENSE_PAD,
) -> torch.Tensor:
    for seq, row0, n, start in seqs:
        ks = gather_positions(k_cache, block_tables[seq], start + n)  # [1, Hkv, start + n, D]
        vs = gather_positions(v_cache, block_tables[seq], start + n)
        if start == 0:  # padded to a multiple of pad rows: zero queries and keys behind the real ones
            m = -(-n // pad) * pad
            qs = padded(q[row0 : row0 + n], m)
            kp, vp = padded(ks[0].transpose(0, 1), m), padded(vs[0].transpose(0, 1), m)
            o = lse_attention(qs, kp, vp, True, scale)[0][:, :, :n]
        else:
            qs = q[row0 : row0 + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            own, lse_own = lse_attention(qs, ks[:, :, start:], vs[:, :, start:], True, scale)
            pre, lse_pre = lse_attention(qs, ks[:, :, :start], vs[:, :, :start], False, scale)
            lse = torch.logaddexp(lse_pre, lse_own)  # [1, Hq, n]
            o = pre.float() * torch.exp(lse_pre - lse)[..., None] + own.float() * torch.exp(lse_own - lse)[..., None]
        out[row0 : row0 + n] = o[0].transpose(0, 1)
    return out


def padded(rows: torch.Tensor, m: int) -> torch.Tensor:
    """[n, H, D] -> [1, H, m, D] (a view of a zero-filled [m, H, D]: the layout every call has)."""
    out = rows.new_zeros(m, *rows.shape[1:])
    out[: rows.shape[0]] = rows
    return out.transpose(0, 1).unsqueeze(0)


def warm(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
         max_rows: int, pad: int = DENSE_PAD) -> int:  # fmt: skip
    """Build cuDNN's plans for every padded fresh-chunk size up to max_rows (what a step can
    route to it); returns how many."""
    sizes = range(pad, -(-max_rows // pad) * pad + 1, pad)
    for m in sizes:
        q = padded(torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device), m)
        k = padded(torch.zeros(1, num_kv_heads, head_dim, dtype=dtype, device=device), m)
        cudnn_lse_attention(q, k, k, True, head_dim**-0.5)
    return len(sizes)


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
        err = 0.0
        # 40 fresh rows padded to 64; 64 rows at positions 64 .. 127 after a 64-token prefix
        for seqs, rows in (([(0, 0, 40, 0)], slice(0, 40)), ([(0, 32, 64, 64)], slice(32, 96))):
            args = (q, k_cache, v_cache, table, seqs, 128**-0.5)
            got = attend_dense(*args, torch.zeros_like(q), cudnn_lse_attention, 64)
            want = attend_dense(*args, torch.zeros_like(q), math_lse_attention, 64)
            err = max(err, (got[rows].float() - want[rows].float()).abs().max().item())
    except Exception as e:  # no cuDNN attention for this card, dtype or build
        return f"cuDNN attention failed: {str(e).splitlines()[0][:200]}"
    if not err < 0.05:
        return f"cuDNN attention disagrees with the reference (max error {err:.3g})"
    return None
