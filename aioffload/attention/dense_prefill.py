"""Long prefill chunks through cuDNN's fused attention (issue 14: the 32k prompt).

Measured on the H200 (BENCHMARKS.md, third session, calls 1-2), Llama-3-8B heads at 32k: cuDNN's
attention (SDPA's CUDNN backend) runs at 650-690 TFLOP/s, our Triton tile kernel at 300-390,
FlashAttention-2 (SDPA's flash backend) at ~350. So an eager step hands each chunk of at least
`DENSE_MIN_ROWS` rows to cuDNN; smaller chunks, decode rows and everything inside a CUDA graph
stay on the Triton kernels.

cuDNN builds an execution plan for every new shape, ~15 ms each: with a chunk's key count
changing every step, a cold 32k prompt in 2048-token chunks took 1780 ms against 1312 ms warm
(call 2). So every call here has a shape that is a multiple of a grain (`attend_dense`: zero rows
and keys pad the calls, which no real row sees), the grain is fixed per worker from its token
budget (`grain_for`), and `warm` builds every such plan at start-up.

A chunk of n rows at positions start .. start + n - 1 sees keys 0 .. its own position: the keys
come out of the paged cache in position order (the rope op has already written the chunk's own
K/V there), and cuDNN's causal mask is top-left aligned, so a chunk after a cached prefix is two
calls merged through their log-sum-exps.

`lse_attention` is the attention call (q [1, Hq, n, D], k/v [1, Hkv, L, D]) -> (out [1, Hq, n, D],
natural-log LSE [1, Hq, n] float32): `cudnn_lse_attention` on CUDA, `math_lse_attention` (plain
PyTorch) where tests check the gather/pad/split/merge logic on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from aioffload.attention.kv_cache import gather_positions

log = logging.getLogger("aioffload.attention")

DENSE_MIN_ROWS = 1024  # rows from which a chunk goes to cuDNN (per-sequence calls cost ~10 launches a layer)
DENSE_PAD = 1024  # the smallest shape grain (grain_for): calls have multiples of it as their sizes
# A chunk's causal square (its own keys) pads to a multiple of this instead: a fresh 32000-token
# prompt is a square of 32000, not 32768 (4.9% fewer attention pairs), at 128 plans up to 32768.
SQUARE_PAD = 256

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


def gather_padded(cache: torch.Tensor, block_table: torch.Tensor, lo: int, hi: int, m: int) -> torch.Tensor:
    """[1, Hkv, m, D]: one sequence's keys (or values) at positions lo .. hi - 1, then zeros, as a
    view of a [m, Hkv, D] (its strides follow from m alone: cuDNN's plan cache keys on them); the
    gathered rows themselves when they fill it."""
    rows = gather_positions(cache, block_table, lo, hi)
    if hi - lo == m:
        return rows.transpose(0, 1).unsqueeze(0)
    out = cache.new_zeros(m, *cache.shape[2:])
    out[: hi - lo] = rows
    return out.transpose(0, 1).unsqueeze(0)


def grain_for(max_rows: int) -> int:
    """Shape grain for steps of up to max_rows tokens: 1024, or a quarter of max_rows (a power of
    two) when that is larger, so a step's chunk takes at most 4 query sizes."""
    g = DENSE_PAD
    while g * 4 < max_rows:
        g *= 2
    return g


def attend_dense(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, B] int32
    seqs: Sequence[tuple[int, int, int, int]],  # (sequence, first row, rows, first position)
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]: these rows are written
    lse_attention: LseAttention,
    grain: int = DENSE_PAD,
) -> torch.Tensor:
    """Each chunk's attention in at most two calls whose shapes are multiples of `grain` or of
    SQUARE_PAD (a few plans serve every chunk; a grain below SQUARE_PAD pads the square to itself).
    For n rows at positions s .. s + n - 1, with P = s rounded down to the grain and d = s - P:
    - the prefix [0, P), no mask: the n rows padded with zero rows to a multiple of the grain;
    - keys P .. s + n - 1 under the causal mask, as a square: d zero rows, the n rows, zero rows
      to a multiple of SQUARE_PAD (or the grain), against those keys and zero keys to the same
      size. Row d + i (position s + i) sees keys P .. s + i; no real row sees the padding.
    The two merge through their log-sum-exps (a fresh chunk, P = 0, is the square alone)."""
    for seq, row0, n, start in seqs:
        rows, table = q[row0 : row0 + n], block_tables[seq]
        p = start // grain * grain
        d = start - p
        pad = min(grain, SQUARE_PAD)
        m = -(-(d + n) // pad) * pad
        own_q = padded(rows, m, d)
        own_k, own_v = (gather_padded(c, table, p, start + n, m) for c in (k_cache, v_cache))
        own, lse_own = lse_attention(own_q, own_k, own_v, True, scale)
        own, lse_own = own[:, :, d : d + n], lse_own[:, :, d : d + n]
        if p == 0:
            o = own
        else:
            pre_q = padded(rows, -(-n // grain) * grain)
            pre_k, pre_v = (gather_padded(c, table, 0, p, p) for c in (k_cache, v_cache))
            pre, lse_pre = lse_attention(pre_q, pre_k, pre_v, False, scale)
            pre, lse_pre = pre[:, :, :n], lse_pre[:, :, :n]
            lse = torch.logaddexp(lse_pre, lse_own)  # [1, Hq, n]
            o = pre.float() * torch.exp(lse_pre - lse)[..., None] + own.float() * torch.exp(lse_own - lse)[..., None]
        out[row0 : row0 + n] = o[0].transpose(0, 1)
    return out


def padded(rows: torch.Tensor, m: int, first: int = 0) -> torch.Tensor:
    """[n, H, D] -> [1, H, m, D]: a view of a zero-filled [m, H, D] holding rows at first .. first + n - 1
    (the layout every call has, so one plan per shape serves them all); a view of `rows` itself when
    they fill it (its strides are the same: rows of a step's contiguous [T, H, D])."""
    if first == 0 and rows.shape[0] == m and rows.is_contiguous():
        return rows.transpose(0, 1).unsqueeze(0)
    out = rows.new_zeros(m, *rows.shape[1:])
    out[first : first + rows.shape[0]] = rows
    return out.transpose(0, 1).unsqueeze(0)


def warm(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
         max_rows: int, max_len: int, block_size: int = 16) -> int:  # fmt: skip
    """Run `attend_dense` once for every shape a chunk of up to max_rows rows in a max_len context
    can give (cuDNN builds a plan per shape, ~15 ms each); returns the number of chunks run."""
    g = grain_for(max_rows)
    cases = [(m, 0) for m in range(SQUARE_PAD, max_rows + g + 1, SQUARE_PAD)]  # the squares: d + n up to max_rows + g
    cases += [(n, p) for n in range(g, -(-max_rows // g) * g + 1, g) for p in range(g, max_len - n + 1, g)]
    return _run_cases(num_heads, num_kv_heads, head_dim, dtype, device, cases, g, max(max_len, max_rows + g),
                      block_size)  # fmt: skip


def warm_squares(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 above: int, max_rows: int, grain: int, block_size: int = 16) -> int:  # fmt: skip
    """Build the plans of fresh chunks' squares of more than `above` and up to max_rows rows (a worker
    whose lone prompts take longer steps than its token budget, worker.idle_token_budget)."""
    first, last = above // SQUARE_PAD * SQUARE_PAD + SQUARE_PAD, -(-max_rows // SQUARE_PAD) * SQUARE_PAD
    cases = [(m, 0) for m in range(first, last + 1, SQUARE_PAD)]
    return _run_cases(num_heads, num_kv_heads, head_dim, dtype, device, cases, grain, max_rows, block_size)


def _run_cases(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
               cases: list[tuple[int, int]], grain: int, max_len: int, block_size: int) -> int:  # fmt: skip
    """attend_dense once for each (rows, first position) over zero K/V; returns the number run."""
    if not cases:
        return 0
    nb = -(-max(max_len, max(n + p for n, p in cases) + grain) // block_size) + 1
    cache = torch.zeros(nb + 1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    table = torch.arange(nb, dtype=torch.int32, device=device)[None]
    q = torch.zeros(max(n for n, _ in cases), num_heads, head_dim, dtype=dtype, device=device)
    for n, start in cases:
        attend_dense(q, cache, cache, table, [(0, 0, n, start)], head_dim**-0.5, torch.empty_like(q),
                     cudnn_lse_attention, grain)  # fmt: skip
    return len(cases)


def probe_cudnn(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when cuDNN's attention gives this machine the reference's answer on a small GQA chunk
    after a prefix (the merge included), else why it cannot be used."""
    if device.type != "cuda":
        return "not a CUDA device"
    try:
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(96, 8, 128, device=device, dtype=dtype, generator=g)  # [T, Hq, D]: 32 prefix rows unused
        k_cache = torch.randn(10, 16, 2, 128, device=device, dtype=dtype, generator=g)
        v_cache = torch.randn_like(k_cache)
        table = torch.tensor([[3, 1, 4, 0, 5, 2, 7, 6, 8]], dtype=torch.int32, device=device)
        err = 0.0
        # 40 fresh rows in a square of 64; 64 rows at positions 70 .. 133 after a 70-token prefix
        for seqs, rows in (([(0, 0, 40, 0)], slice(0, 40)), ([(0, 32, 64, 70)], slice(32, 96))):
            args = (q, k_cache, v_cache, table, seqs, 128**-0.5)
            got = attend_dense(*args, torch.zeros_like(q), cudnn_lse_attention, 64)
            want = attend_dense(*args, torch.zeros_like(q), math_lse_attention, 64)
            err = max(err, (got[rows].float() - want[rows].float()).abs().max().item())
    except Exception as e:  # no cuDNN attention for this card, dtype or build
        return f"cuDNN attention failed: {str(e).splitlines()[0][:200]}"
    if not err < 0.05:
        return f"cuDNN attention disagrees with the reference (max error {err:.3g})"
    return None
