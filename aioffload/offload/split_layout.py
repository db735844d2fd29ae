"""The host buffer of an offloaded layer laid out for a host/GPU split of its MLP.

The MLP's intermediate dimension I is cut into C chunks of `chunk` units (128 for
Llama-3-8B: C = 112). For a split at k, the host computes chunks [0, k) from its own
buffer and the GPU computes chunks [k, C) from the streamed share. The buffer is

    [ gate|up of chunk 0, 1, ..., C-1 | attention weights | down^T of chunk C-1, ..., 1, 0 ]
      (2 x chunk rows of H each)                              (chunk rows of H each)

so for every k the streamed share (gate|up of chunks k.., the attention weights, down^T of
chunks ..k) is one contiguous range, and the host share is the two ends. Streamed bytes
land in the staging slot at the same offsets, so one set of offsets serves both places.

Per chunk c, the MLP output is silu(h @ gate_c^T) * (h @ up_c^T) @ down^T_c; the layer's
output is the sum over chunks, whichever side computed them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from aioffload.model.layout import _ALIGN, LayerLayout, LayerWeights

MLP_PARAMS = ("gate_up_w", "down_w")
DEFAULT_CHUNK = 128


def pick_chunk(intermediate: int, preferred: int = DEFAULT_CHUNK) -> int:
    """The largest divisor of `intermediate` that is at most `preferred` (128 for every
    Llama-3/Qwen shape; small models get a smaller chunk)."""
    return next(c for c in range(min(preferred, intermediate), 0, -1) if intermediate % c == 0)


@dataclass(frozen=True)
class SplitLayout:
    hidden: int
    intermediate: int
    chunk: int
    attn: LayerLayout  # the attention params, offsets absolute in the split buffer; numel = down_offset
    down_offset: int  # start of the down^T region (elements)
    numel: int

    @property
    def num_chunks(self) -> int:
        return self.intermediate // self.chunk

    @property
    def attn_offset(self) -> int:
        return self.num_chunks * 2 * self.chunk * self.hidden

    @property
    def chunk_numel(self) -> int:
        """Elements of one chunk's weights (gate + up + down^T rows)."""
        return 3 * self.chunk * self.hidden

    def streamed_range(self, k: int) -> tuple[int, int]:
        """[lo, hi) elements the GPU needs when the host computes chunks [0, k)."""
        ch = self.chunk * self.hidden
        return k * 2 * ch, self.down_offset + (self.num_chunks - k) * ch

    def gate_up_rows(self, flat: torch.Tensor, lo_chunk: int, hi_chunk: int) -> torch.Tensor:
        """[(hi - lo) x 2 x chunk, H]: gate|up rows of chunks [lo, hi), ascending."""
        ch = self.chunk * self.hidden
        return flat[lo_chunk * 2 * ch : hi_chunk * 2 * ch].view(-1, self.hidden)

    def down_t_rows(self, flat: torch.Tensor, lo_chunk: int, hi_chunk: int) -> torch.Tensor:
        """[(hi - lo) x chunk, H]: down^T rows of chunks [lo, hi), in memory order (hi - 1 first)."""
        ch, c = self.chunk * self.hidden, self.num_chunks
        start = self.down_offset + (c - hi_chunk) * ch
        return flat[start : start + (hi_chunk - lo_chunk) * ch].view(-1, self.hidden)


def split_layout(base: LayerLayout, hidden: int, intermediate: int, chunk: int | None = None) -> SplitLayout:
    """The split layout of a layer whose standard layout is `base` (model/layout.py)."""
    chunk = chunk or pick_chunk(intermediate)
    if intermediate % chunk:
        raise ValueError(f"chunk {chunk} does not divide the intermediate size {intermediate}")
    offset = (intermediate // chunk) * 2 * chunk * hidden
    specs = []
    for p in base.params:
        if p.name in MLP_PARAMS:
            continue
        specs.append(dataclasses.replace(p, offset=offset))
        n = 1
        for s in p.shape:
            n *= s
        offset += -(-n // _ALIGN) * _ALIGN
    attn = LayerLayout(tuple(specs), offset)
    return SplitLayout(hidden, intermediate, chunk, attn, offset, offset + intermediate * hidden)


class SplitWeights(LayerWeights):
    """A split layer's views for one step: the attention weights (as LayerWeights names) and
    the GPU share of the MLP, chunks [k, C). `host_gate_up` views the host buffer's gate|up rows
    of chunks [0, k) (None when k = 0); the host reads that share's down projection from a copy of
    its own (offload/split_mlp.py)."""

    def __init__(self, flat: torch.Tensor, split: SplitLayout, k: int, host: torch.Tensor) -> None:
        super().__init__(flat, split.attn)
        c = split.num_chunks
        self.split, self.k = split, k
        self.gate_up = split.gate_up_rows(flat, k, c)  # [(C-k) 2 ch, H]
        self.down_t = split.down_t_rows(flat, k, c)  # [(C-k) ch, H], chunk C-1 first
        self.host_gate_up = split.gate_up_rows(host, 0, k) if k else None  # [k 2 ch, H]


def fill_mlp(split: SplitLayout, flat: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """Write gate [I, H], up [I, H], down [H, I] into `flat`'s MLP regions (split layout)."""
    ch, c, hdim = split.chunk, split.num_chunks, split.hidden
    gu = split.gate_up_rows(flat, 0, c).view(c, 2, ch, hdim)  # [C, 2, ch, H]
    gu[:, 0].copy_(gate.view(c, ch, hdim))
    gu[:, 1].copy_(up.view(c, ch, hdim))
    dt = split.down_t_rows(flat, 0, c).view(c, ch, hdim)  # memory order: chunk C-1 first
    dt.copy_(down.t().reshape(c, ch, hdim).flip(0))

