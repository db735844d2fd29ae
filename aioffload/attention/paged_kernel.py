"""Triton row-wise paged attention with split-KV (flash-decoding): decode rows.

One program per (query row, KV head, split) handles the whole GQA group of that head, with
an online softmax over BLOCK_N keys at a time. A row sees `row_ctx` keys of sequence
`row_seq`; split i of num_splits takes the i-th slice of them (slices rounded up to
BLOCK_N keys, so at short contexts the last splits are empty and contribute nothing).
With num_splits > 1 the programs write partial (acc, max, sum) and the last of them to finish
for a (row, KV head) combines the splits itself ("last block reduces", as split-K GEMMs do),
so a split step is one launch; with 1 the program writes the output itself.

Last-block combine. Each split program stores its partials, runs `tl.debug_barrier()` (a
bar.sync: all of its threads' stores come first) and increments an int32 counter for its (row,
KV head) once, with tl.atomic_add's default acq_rel at GPU scope. The program that gets
num_splits - 1 back is the last: the increments form one chain of read-modify-writes, each
program's release (after its barrier) covers its partials, and the last one's acquire sees them
all, so it reads every split with plain loads, writes the GROUP output rows, and stores 0 back
into the counter (no other program touches it again in this launch; the next launch, a CUDA
graph replay too, runs after this one on the stream). Triton lowers a scalar atomic to thread 0
plus a shared-memory broadcast, so the PTX is CUTLASS's semaphore pattern: st.global partials;
bar.sync; thread 0 atom.acq_rel.gpu.add; bar.sync; branch on the count; ld.global partials.

The counters live in a persistent int32 buffer per device (`split_counters`), zeroed once when
created and left all zero by every launch, so a launch adds no memset. An eager call creates
(or grows) it, e.g. the warm-up that precedes each CUDA graph capture; a call during capture
that finds it missing or too small takes a graph-owned `torch.zeros` for that call instead (a
memset node the graph replays: correct, one extra node). Grown-out buffers are kept alive, as
captured graphs may point at them. Every launch on a device shares its buffer: two streams must
not run this kernel at the same time (the engine runs attention on one stream at a time).
`combine_kernel=True` keeps the separate combine launch, for comparison: on an H200 at batch 1
(32 splits, D 128, under a CUDA graph) the fused step was ~1 us a layer faster at GQA group 4 and
about even at group 8, where the one combining program per KV head reads twice the partials.

The split count depends only on the number of rows and KV heads (`num_splits`), never on
the context, so a captured CUDA graph replays the same grid at any context length. It is a
runtime argument: one compiled kernel serves every batch bucket.

Every row is computed correctly whatever its row_ctx (prefill rows too), but prefill chunks
go to the tiled prefill kernel: a row here reads its whole context on its own. Imported
lazily (CUDA only); tests run it on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aioffload.attention.kernel_util import LOG2E, dot, dot_f32, splits_for

MAX_SPLITS = 32
CPU_SMS = 4  # the interpreter has no SMs: a small figure, so CPU tests exercise several splits
MIN_COUNTERS = 1024  # split counters allocated at least: splits > 1 only while rows x KV heads <= the SMs
# fp32 partials the combining program loads at a time (a [GROUP, splits, D] tile: 128 registers a
# thread at 4 warps). The fastest of 2k..32k on an H200 at batch 1, GQA groups 4 and 8, D 128.
COMBINE_TILE = 16384

_counters: dict[torch.device, torch.Tensor] = {}  # per device; all zero between launches
_retired: list[torch.Tensor] = []  # grown-out buffers: captured graphs may still use them


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """An all-zero int32 buffer of at least n counters on `device`, which the kernel leaves all
    zero. The persistent one where it is large enough (the common case: no allocation, no
    memset); created or grown outside CUDA graph capture; during capture, if it is too small, a
    fresh zeros tensor owned by the graph (its memset is replayed with the kernel)."""
    buf = _counters.get(device)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    if buf is not None:
        _retired.append(buf)
    buf = _counters[device] = torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf


@triton.jit
def _combine_splits(o_ptr, part_acc_ptr, part_ml_ptr, slot0, num_splits,
                    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):  # fmt: skip
    """o[:HEAD_DIM] = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i over the num_splits
    partials of one (row, head), at slots slot0 .. slot0 + num_splits - 1."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    slot = slot0 + offs_s  # [S]
    m = tl.load(part_ml_ptr + slot * 2, mask=s_mask, other=float("-inf"))
    lsum = tl.load(part_ml_ptr + slot * 2 + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # [S]; split 0 is never empty, so the max is finite
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)  # [D]
    tl.store(o_ptr + offs_d, out.to(o_ptr.dtype.element_ty))


@triton.jit
def _combine_group(o_ptr, stride_oh, part_acc_ptr, part_ml_ptr, slot0, num_splits,
                   GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                   SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """_combine_splits for the GROUP query heads of one (row, KV head) at once: heads h = 0..GROUP-1
    at o_ptr + h * stride_oh, their partials at slots slot0 + h * num_splits + split. Every load
    comes before the one store (a store between heads would order the next head's loads after it:
    the compiler cannot tell the output from the partials), CHUNK splits at a time."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    offs_s = tl.arange(0, SPLITS_PAD)
    slot = slot0 + offs_g[:, None] * num_splits + offs_s[None, :]  # [G, S]
    m = tl.load(part_ml_ptr + slot * 2, mask=g_mask[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"))
    m_max = tl.where(g_mask, tl.max(m, axis=1), 0.0)  # [G]; split 0 is never empty: finite for real heads
    acc = tl.zeros([GROUP_P2, HEAD_DIM], dtype=tl.float32)
    lsum = tl.zeros([GROUP_P2], dtype=tl.float32)
    for c in tl.static_range(SPLITS_PAD // CHUNK):
        offs_c = c * CHUNK + tl.arange(0, CHUNK)
        mask = g_mask[:, None] & (offs_c < num_splits)[None, :]  # [G, C]
        slot = slot0 + offs_g[:, None] * num_splits + offs_c[None, :]
        m_c = tl.load(part_ml_ptr + slot * 2, mask=mask, other=float("-inf"))
        l_c = tl.load(part_ml_ptr + slot * 2 + 1, mask=mask, other=0.0)
        a_c = tl.load(part_acc_ptr + slot[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=mask[:, :, None],
                      other=0.0)  # fmt: skip
        w = tl.exp2(m_c - m_max[:, None])  # [G, C]
        acc += tl.sum(a_c * w[:, :, None], axis=1)
        lsum += tl.sum(l_c * w, axis=1)
    out = acc / tl.where(g_mask, lsum, 1.0)[:, None]
    tl.store(o_ptr + offs_g[:, None] * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=g_mask[:, None])  # fmt: skip


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])  # per-step values: no recompiles
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, row_seq_ptr, row_ctx_ptr, rows_ptr,
    part_acc_ptr, part_ml_ptr, counter_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_ROWS: tl.constexpr,
    DOT_F32: tl.constexpr, FUSED_COMBINE: tl.constexpr, SPLITS_PAD: tl.constexpr,
    GROUP_P2: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    seq = tl.load(row_seq_ptr + row)
    ctx = tl.load(row_ctx_ptr + row)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_n
        valid = t < hi
        blk = tl.load(bt_row_ptr + t // BLOCK_SIZE, mask=valid, other=0)
        base = blk.to(tl.int64) * stride_kb + (t % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
        s = dot(q, tl.trans(k), DOT_F32).to(tl.float32) * qk_scale  # [G, N], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32).to(tl.float32)
        m_i = m_new
    if not SPLIT:
        tl.store(
            o_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
            mask=g_mask[:, None],
        )
    else:
        # Partials [R, Hq, num_splits, D] and [R, Hq, num_splits, 2]; an empty split stores (0, -inf, 0).
        slot = (pid * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [G]
        tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + slot * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + slot * 2 + 1, l_i, mask=g_mask)
        if FUSED_COMBINE:
            # Last block reduces (module docstring): the barrier puts all of this program's stores
            # before its increment, whose release publishes them; the last increment's acquire
            # sees every split's.
            tl.debug_barrier()
            counter = counter_ptr + pid * tl.num_programs(1) + kvh
            done = tl.atomic_add(counter, 1)  # sem="acq_rel", scope="gpu"; the old count
            if done == num_splits - 1:  # the last split of this (row, KV head): combine the group
                _combine_group(o_ptr + row * stride_ot + kvh * GROUP * stride_oh, stride_oh, part_acc_ptr, part_ml_ptr,
                               (pid * tl.num_programs(1) + kvh) * GROUP * num_splits, num_splits,
                               GROUP, GROUP_P2, HEAD_DIM, SPLITS_PAD, CHUNK)  # fmt: skip
                tl.store(counter, 0)  # every split has counted: ready for the next launch


@triton.jit
def _combine_kernel(
    o_ptr, rows_ptr, part_acc_ptr, part_ml_ptr,
    num_splits,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """The separate combine launch (combine_kernel=True): one program per (row, query head)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    _combine_splits(o_ptr + row * stride_ot + head * stride_oh, part_acc_ptr, part_ml_ptr,
                    (pid * tl.num_programs(1) + head) * num_splits, num_splits, HEAD_DIM, SPLITS_PAD)  # fmt: skip


def num_splits(num_rows: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per (row, KV head): enough programs for ~2 waves over the SMs, a power of two,
    at most MAX_SPLITS; 1 once rows x heads alone fill the machine."""
    return splits_for(num_rows * num_kv_heads, num_sms, MAX_SPLITS)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, B] int32
    row_seq: torch.Tensor,  # [T] int32
    row_ctx: torch.Tensor,  # [T] int32, >= 1
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]; only the rows computed are written
    rows: torch.Tensor | None = None,  # [R] int32: compute only these rows (None: every row)
    splits: int = 1,
    *,
    combine_kernel: bool = False,  # splits > 1: combine in a second launch (comparison only)
) -> torch.Tensor:  # [T, Hq, D]
    hq, d = q.shape[1], q.shape[2]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.empty_like(q) if out is None else out
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    r = q.shape[0] if rows is None else rows.shape[0]
    if r == 0:
        return out
    assert 1 <= splits <= MAX_SPLITS, f"splits must be in 1..{MAX_SPLITS}, got {splits}"
    if splits > 1:
        part_acc = torch.empty(r, hq, splits, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(r, hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    fused = splits > 1 and not combine_kernel
    group_p2 = triton.next_power_of_2(group)
    counters = split_counters(q.device, r * hkv) if fused else row_seq  # unused unless fused
    _paged_attn_kernel[(r, hkv, splits)](
        q, k_cache, v_cache, out, block_tables, row_seq, row_ctx, rows if rows is not None else row_seq,
        part_acc, part_ml, counters,
        scale * LOG2E, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_SIZE=block_size, BLOCK_N=64, SPLIT=splits > 1, HAS_ROWS=rows is not None,
        DOT_F32=dot_f32(q), FUSED_COMBINE=fused, SPLITS_PAD=MAX_SPLITS,
        GROUP_P2=group_p2, CHUNK=max(1, min(MAX_SPLITS, COMBINE_TILE // (group_p2 * d))),
    )  # fmt: skip
    if splits > 1 and not fused:
        _combine_kernel[(r, hq)](
            out, rows if rows is not None else row_seq, part_acc, part_ml,
            splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=d, SPLITS_PAD=MAX_SPLITS, HAS_ROWS=rows is not None,
        )  # fmt: skip
    return out
