"""Attention over the paged KV cache, behind one interface.

Backends:
- `sdpa`: gathers each sequence's blocks and calls scaled_dot_product_attention; runs
  anywhere, used on the CPU (CI).
- `torch` (CUDA default): Triton kernels that walk block tables, no Python loop over
  sequences: prefill chunks in query tiles (`prefill_kernel.py`, FlashAttention-style),
  decode rows split over the context (`paged_kernel.py`, flash-decoding; graph-capturable);
  in eager steps, chunks of at least `dense_prefill.DENSE_MIN_ROWS` rows go to cuDNN's
  fused attention instead (`dense_prefill.py`: twice the tile kernel's rate at 32k), when a
  probe at start-up finds it gives the reference's answer.
- `xformers`: memory-efficient attention with a bottom-right causal block-diagonal bias;
  chosen only when a probe finds its CUDA kernels (our GPU image's wheel has none).

Every backend first writes this step's K and V into the cache at `slot_mapping`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aioffload.attention import dense_prefill
from aioffload.attention.kv_cache import gather_positions

log = logging.getLogger("aioffload.attention")


@dataclass
class AttentionMetadata:
    """Shapes: T tokens this step, S sequences, B max blocks per sequence."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot each token's K/V goes to
    block_tables: torch.Tensor  # [S, B] int32
    row_seq: torch.Tensor  # [T] int32: sequence index of each query row
    row_ctx: torch.Tensor  # [T] int32: keys visible to each query row (causal limit)
    last_token_idx: torch.Tensor  # [R] int64: rows whose logits are returned, each sequence's last (R = S) or
    # last num_logits rows (speculative verification)
    query_lens: list[int]  # host copies for the eager, per-sequence paths
    seq_lens_host: list[int]
    # Split between the Triton kernels (tiles.py). None: every row goes to the row-wise decode
    # kernel (decode-only steps, such as the CUDA-graph runner's).
    prefill_tiles: torch.Tensor | None = None  # [N, 4] int32: seq, first row, rows, first position
    decode_rows: torch.Tensor | None = None  # [R] int32: rows of one-token sequences (with prefill_tiles)
    # Chunks for cuDNN (dense_prefill.py), left out of prefill_tiles: (sequence, first row, rows, first position).
    dense_seqs: list[tuple[int, int, int, int]] | None = None
    # Every row is its sequence's one new token and its logits row (last_token_idx is every row in
    # order): the model skips the last-row gathers.
    decode_only: bool = False
    # The logits rows alone (last_token_idx's rows, in order) as a step of their own: the model's last
    # layer attends with it once every row's K/V is written, and leaves the other rows out (None: it
    # computes every row).
    logits_rows: AttentionMetadata | None = None


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    hkv, d = k_cache.shape[-2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v)


class AttentionBackend:
    """`attend` reads K/V from the paged cache only; the model's rope op has already
    written this step's K/V (`forward` does both, for callers that have raw K/V)."""

    name: str
    # Chunks of at least this many query rows take the backend's dense path (None: it has none);
    # worker/inputs.py leaves them out of the Triton tiles.
    dense_min_rows: int | None = None

    def warm_dense(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, max_rows: int, max_len: int) -> None:  # fmt: skip
        """Prepare the dense path for steps of up to max_rows tokens in max_len contexts (nothing
        to do without one)."""

    def warm_fresh(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, above: int, max_rows: int) -> None:  # fmt: skip
        """Prepare the dense path for fresh chunks of more than `above` and up to max_rows rows."""

    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_blocks + 1, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def attend(self, q, k_cache, v_cache, meta, scale):  # type: ignore[no-untyped-def]
        out = torch.empty_like(q)
        start = 0
        for s, (ql, sl) in enumerate(zip(meta.query_lens, meta.seq_lens_host, strict=True)):
            ks = gather_positions(k_cache, meta.block_tables[s], 0, sl).transpose(0, 1)  # [Hkv, L, D]
            vs = gather_positions(v_cache, meta.block_tables[s], 0, sl).transpose(0, 1)
            qs = q[start : start + ql].transpose(0, 1)  # [Hq, ql, D]
            # Query i sits at position sl - ql + i and sees keys 0..that position.
            mask = None
            if ql > 1:
                mask = torch.ones(ql, sl, dtype=torch.bool, device=q.device).tril(sl - ql)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start : start + ql] = o.transpose(0, 1)
            start += ql
        return out


class TritonPagedBackend(AttentionBackend):
    """Prefill chunks go to the tiled prefill kernel, one-token rows to the split-KV decode
    kernel: two launches in a mixed step, one in a decode-only step (graph-capturable: its
    grid depends on the number of rows only)."""

    name = "torch"

    def __init__(self) -> None:
        from aioffload.attention import paged_kernel, prefill_kernel

        self._decode = paged_kernel
        self._prefill = prefill_kernel.prefill_attention
        self._prefill_splits = prefill_kernel.num_splits
        self._num_sms: int | None = None
        self.dense_grain = dense_prefill.DENSE_PAD  # shapes of the cuDNN calls: multiples of this (warm_dense)

    def warm_dense(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, max_rows: int, max_len: int) -> None:  # fmt: skip
        """Fix the shape grain for steps of up to max_rows tokens and build cuDNN's plans for every
        shape such a step can route to it (dense_prefill.warm)."""
        if self.dense_min_rows is None or max_rows < self.dense_min_rows:
            return
        t = time.perf_counter()
        self.dense_grain = dense_prefill.grain_for(max_rows)
        # A chunk shorter than the grain would pad its causal square to up to 4x its pairs.
        self.dense_min_rows = max(self.dense_min_rows, self.dense_grain)
        n = dense_prefill.warm(num_heads, num_kv_heads, head_dim, dtype, device, max_rows, max_len)
        log.info("prefill attention: cuDNN plans for %d chunk shapes (grain %d rows, chunks of %d-%d rows, "
                 "contexts up to %d) built in %.2f s", n, self.dense_grain, self.dense_min_rows, max_rows, max_len,
                 time.perf_counter() - t)  # fmt: skip

    def warm_fresh(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, above: int, max_rows: int) -> None:  # fmt: skip
        """Build cuDNN's plans for fresh chunks of more than `above` and up to max_rows rows (a lone
        prompt's step past the token budget, worker.idle_token_budget); logged."""
        if self.dense_min_rows is None:
            return
        t = time.perf_counter()
        n = dense_prefill.warm_squares(num_heads, num_kv_heads, head_dim, dtype, device, above, max_rows,
                                       self.dense_grain)  # fmt: skip
        log.info("prefill attention: cuDNN plans for %d fresh chunk shapes (%d-%d rows, squares of multiples "
                 "of %d) built in %.2f s", n, above + 1, max_rows, dense_prefill.SQUARE_PAD,
                 time.perf_counter() - t)  # fmt: skip

    def enable_dense(self, device: torch.device, min_rows: int = dense_prefill.DENSE_MIN_ROWS) -> None:
        """Send eager chunks of >= min_rows rows to cuDNN when its probe passes; log the decision."""
        reason = dense_prefill.probe_cudnn(device)
        self.dense_min_rows = min_rows if reason is None else None
        if reason is None:
            log.info("prefill attention: cuDNN for eager chunks of >= %d rows, Triton tiles for the rest", min_rows)
        else:
            log.info("prefill attention: Triton tiles only (%s)", reason)

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            cuda = device.type == "cuda"
            sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else None
            self._num_sms = sms or self._decode.CPU_SMS
        return self._num_sms

    def _splits(self, num_rows: int, num_kv_heads: int, device: torch.device) -> int:
        return self._decode.num_splits(num_rows, num_kv_heads, self._sms(device))

    def attend(self, q, k_cache, v_cache, meta, scale):  # type: ignore[no-untyped-def]
        out = torch.empty_like(q)
        rows = meta.decode_rows
        if meta.dense_seqs:
            dense_prefill.attend_dense(q, k_cache, v_cache, meta.block_tables, meta.dense_seqs, scale, out,
                                       dense_prefill.cudnn_lse_attention, self.dense_grain)  # fmt: skip
        if meta.prefill_tiles is not None and meta.prefill_tiles.shape[0]:
            n_tiles = meta.prefill_tiles.shape[0]  # the grid: fixed for a captured graph
            splits = self._prefill_splits(q.shape[1], n_tiles, self._sms(q.device))
            self._prefill(q, k_cache, v_cache, meta.block_tables, meta.prefill_tiles, scale, out, splits=splits)
            assert rows is not None, "prefill_tiles come with decode_rows (tiles.plan_rows)"
        num_rows = q.shape[0] if rows is None else rows.shape[0]
        if num_rows:
            splits = self._splits(num_rows, k_cache.shape[2], q.device)
            self._decode.paged_attention(
                q, k_cache, v_cache, meta.block_tables, meta.row_seq, meta.row_ctx, scale, out, rows, splits
            )
        return out


class XformersBackend(AttentionBackend):
    name = "xformers"

    def __init__(self) -> None:
        import xformers.ops as xops
        from xformers.ops import fmha

        self._xops, self._fmha = xops, fmha

    def attend(self, q, k_cache, v_cache, meta, scale):  # type: ignore[no-untyped-def]
        tables, lens = meta.block_tables, meta.seq_lens_host

        def every_sequence(cache: torch.Tensor) -> torch.Tensor:  # [sum of lengths, Hkv, D]
            return torch.cat([gather_positions(cache, tables[s], 0, n) for s, n in enumerate(lens)])

        ks, vs = every_sequence(k_cache), every_sequence(v_cache)
        hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
        g = hq // hkv
        bias = self._fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
            meta.query_lens, meta.seq_lens_host
        )
        # xformers' GQA layout: [1, T, Hkv, G, D] with K/V expanded over the group.
        q5 = q.reshape(1, -1, hkv, g, d)
        k5 = ks.view(1, -1, hkv, 1, d).expand(-1, -1, -1, g, -1)
        v5 = vs.view(1, -1, hkv, 1, d).expand(-1, -1, -1, g, -1)
        o = self._xops.memory_efficient_attention_forward(q5, k5, v5, attn_bias=bias, scale=scale)
        return o.view_as(q)


def probe_xformers(device: torch.device) -> str | None:
    """None when xformers can run a CUDA attention here, else the reason it cannot."""
    if device.type != "cuda":
        return "xformers needs a CUDA device"
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a wheel built against another torch
        return f"import failed: {str(e).splitlines()[0][:200]}"
    try:
        x = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
        xops.memory_efficient_attention_forward(x, x, x)
        torch.cuda.synchronize(device)
    except Exception as e:
        return f"no usable CUDA kernels: {str(e).splitlines()[0][:200]}"
    return None


def select_backend(requested: str, device: torch.device) -> AttentionBackend:
    """Pick the backend for `requested` (auto|torch|xformers|sdpa) and log the decision."""
    if requested == "sdpa" or (requested == "auto" and device.type != "cuda"):
        log.info("attention backend: sdpa (%s)", "requested" if requested == "sdpa" else f"device is {device.type}")
        return SdpaBackend()
    if device.type != "cuda":
        raise ValueError(f"--attention-backend {requested} needs a CUDA device; use sdpa on {device.type}")
    if requested == "xformers":
        reason = probe_xformers(device)
        if reason is None:
            log.info("attention backend: xformers (probe found CUDA kernels)")
            return XformersBackend()
        log.warning("attention backend: xformers requested but unusable (%s); using torch", reason)
    elif requested == "auto":
        reason = probe_xformers(device)
        log.info("xformers probe: %s", "CUDA kernels available" if reason is None else reason)
    log.info("attention backend: torch (Triton paged-attention kernel)")
    backend = TritonPagedBackend()
    backend.enable_dense(device)
    return backend
