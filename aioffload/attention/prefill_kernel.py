"""Triton tiled prefill attention over the paged KV cache (FlashAttention-style).

One program per (query head, query tile): a tile is up to BLOCK_M consecutive query rows of
one sequence (`tiles.plan_rows`), whose first row sits at position p0 (p0 > 0 for a chunk
after a cached prefix). It walks the sequence's keys BLOCK_N at a time through the block
table with an online softmax in base 2. Keys [0, p0] are visible to every row of the tile,
so those key tiles run without a mask; only the last few, across the causal diagonal, are
masked. Head is the fastest grid axis: the GROUP heads sharing a KV head (GQA) and all
heads of one tile run together and share K/V through L2.

Imported lazily (CUDA only); tests run it on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aioffload.attention.kernel_util import LOG2E, dot, dot_f32, splits_for
from aioffload.attention.tiles import PREFILL_TILE


@triton.jit
def _key_tile(
    acc, l_i, m_i, q, pos, start, kv_end,
    k_ptr, v_ptr, bt_row_ptr, kv_off,
    qk_scale,
    stride_kb, stride_ks,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    """Fold keys [start, start + BLOCK_N) into the running (acc, l_i, m_i) of the tile."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    t = start + offs_n  # [N] key positions
    if MASKED:
        valid = t < kv_end
        blk = tl.load(bt_row_ptr + t // BLOCK_SIZE, mask=valid, other=0)
    else:
        blk = tl.load(bt_row_ptr + t // BLOCK_SIZE)
    base = blk.to(tl.int64) * stride_kb + (t % BLOCK_SIZE) * stride_ks + kv_off  # [N]
    if MASKED:
        k = tl.load(k_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
    else:
        k = tl.load(k_ptr + base[:, None] + offs_d[None, :])
    s = dot(q, tl.trans(k), DOT_F32).to(tl.float32) * qk_scale  # [M, N], log2 units
    if MASKED:
        s = tl.where(valid[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row may see none of a split's keys so far (-inf everywhere): keep its (0, -inf, 0), no NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
    else:
        v = tl.load(v_ptr + base[:, None] + offs_d[None, :])
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32).to(tl.float32)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])  # per-step values: no recompiles
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, tiles_ptr, part_ptr, part_ml_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tiles_ptr + tile * 4)
    row0 = tl.load(tiles_ptr + tile * 4 + 1)
    nrows = tl.load(tiles_ptr + tile * 4 + 2)
    p0 = tl.load(tiles_ptr + tile * 4 + 3)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < nrows
    rows = (row0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=m_valid[:, None],
                other=0.0)  # [M, D]  # fmt: skip
    pos = p0 + offs_m  # [M] position of each row; padding rows past nrows are never stored
    kv_end = p0 + nrows  # keys the tile's last row sees
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_off = (head // GROUP) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end = (p0 + 1) // BLOCK_N * BLOCK_N  # keys [0, p0] are visible to every row
    # This split's keys: the split-th slice of [0, kv_end), slices a whole number of key tiles.
    chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_end)
    for start in range(lo, tl.minimum(hi, full_end), BLOCK_N):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, pos, start, kv_end, k_ptr, v_ptr, bt_row_ptr, kv_off, qk_scale,
                                  stride_kb, stride_ks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_F32)  # fmt: skip
    for start in range(tl.maximum(lo, full_end), hi, BLOCK_N):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, pos, start, kv_end, k_ptr, v_ptr, bt_row_ptr, kv_off, qk_scale,
                                  stride_kb, stride_ks, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_F32)  # fmt: skip
    if SPLIT:  # partials [tiles, Hq, splits, M, D] and [.., M, 2]; an empty split stores (0, -inf, 0)
        slot = ((tile * tl.num_programs(0) + head) * num_splits + split).to(tl.int64) * BLOCK_M + offs_m  # [M]
        tl.store(part_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(part_ml_ptr + slot * 2, m_i)
        tl.store(part_ml_ptr + slot * 2 + 1, l_i)
    else:
        out = acc / l_i[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_valid[:, None])  # fmt: skip


@triton.jit(do_not_specialize=["num_splits"])
def _prefill_combine_kernel(
    o_ptr, tiles_ptr, part_ptr, part_ml_ptr, num_splits,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One program per (query head, tile): out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i
    over the splits, row by row (split 0 is never empty for a row the tile holds)."""
    head = tl.program_id(0)
    tile = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4 + 1)
    nrows = tl.load(tiles_ptr + tile * 4 + 2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = (tile * tl.num_programs(0) + head).to(tl.int64) * num_splits
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for sp in range(0, num_splits):
        m_all = tl.maximum(m_all, tl.load(part_ml_ptr + ((base + sp) * BLOCK_M + offs_m) * 2))
    m_all = tl.where(offs_m < nrows, m_all, 0.0)  # rows past the tile's: no finite max, never stored
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for sp in range(0, num_splits):
        slot = (base + sp) * BLOCK_M + offs_m  # [M]
        w = tl.exp2(tl.load(part_ml_ptr + slot * 2) - m_all)  # [M]; an empty split weighs 0
        lsum += w * tl.load(part_ml_ptr + slot * 2 + 1)
        acc += w[:, None] * tl.load(part_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :])
    m_valid = offs_m < nrows
    rows = (row0 + offs_m).to(tl.int64)
    out = acc / tl.where(m_valid, lsum, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_valid[:, None])  # fmt: skip


MAX_SPLITS = 16


def num_splits(num_heads: int, num_tiles: int, num_sms: int) -> int:
    """Key splits per (head, tile): enough programs for ~2 waves over the SMs, a power of two, at
    most MAX_SPLITS; 1 once heads x tiles fill the machine. A chunk deep in a prompt otherwise runs
    heads x tiles programs that each walk the whole prefix: measured on the H200, a 128-token chunk
    graph at position 8192 took 14.8 ms against 5.6 at position 0, 32 programs for 132 SMs
    (BENCHMARKS.md, third session, call 3)."""
    return splits_for(num_heads * num_tiles, num_sms, MAX_SPLITS)


def launch_config(block_m: int, head_dim: int) -> dict[str, int]:
    """Key tile, warps and pipeline depth for a query tile of block_m rows: 128-key tiles at head
    dim 64, 64-key tiles at 128. At head dim 128, 4 warps: measured on the H200 (BENCHMARKS.md,
    third session, call 1; Llama-3-8B heads) 386 against 318 TFLOP/s with 8 on a fresh 32k prompt,
    358 against 304 on a 2048-row chunk after 30720 cached keys. At 64, one warp per 16 rows, as
    before (not re-measured). `scripts/gpu/probe_long.py` times the alternatives on the card."""
    warps = 4 if head_dim > 64 else max(4, block_m // 16)
    return {"block_n": 128 if head_dim <= 64 else 64, "num_warps": warps, "num_stages": 3}


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, B] int32
    tiles: torch.Tensor,  # [N, 4] int32 (tiles.plan_rows with tile == block_m)
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]: the tiles' rows are written, other rows left alone
    block_m: int = PREFILL_TILE,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    splits: int = 1,  # key splits per (head, tile) (num_splits); > 1 adds a combine launch
) -> torch.Tensor:
    hq, d = q.shape[1], q.shape[2]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert 1 <= splits <= MAX_SPLITS, f"splits must be in 1..{MAX_SPLITS}, got {splits}"
    cfg = launch_config(block_m, d)
    extra = {} if q.device.type == "cpu" else {
        "num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}  # fmt: skip
    n_tiles = tiles.shape[0]
    if splits > 1:
        part = torch.empty(n_tiles * hq * splits * block_m, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(n_tiles * hq * splits * block_m, 2, dtype=torch.float32, device=q.device)
    else:
        part = part_ml = out  # unused
    _prefill_kernel[(hq, n_tiles, splits)](
        q, k_cache, v_cache, out, block_tables, tiles, part, part_ml,
        scale * LOG2E, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n or cfg["block_n"],
        DOT_F32=dot_f32(q), SPLIT=splits > 1, **extra,
    )  # fmt: skip
    if splits > 1:
        _prefill_combine_kernel[(hq, n_tiles)](
            out, tiles, part, part_ml, splits, out.stride(0), out.stride(1), HEAD_DIM=d, BLOCK_M=block_m,
            **({} if q.device.type == "cpu" else {"num_warps": 4}),
        )  # fmt: skip
    return out
