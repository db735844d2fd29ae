"""Reading one rank's slices of safetensors tensors straight into its buffers.

A row slice of a stored [rows, cols] tensor is one contiguous byte range: one read. A column
slice is a strided range: one positioned read (os.preadv) per row, each landing in its row of
the destination, so a rank reads its share of the file and no rank reads a whole model.
"""

from __future__ import annotations

import math
import os

import torch

from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.checkpoint.safetensors_io import SafetensorsError, TensorEntry, byte_view, read_into
from aioffload.distributed.sharding import Slice, TPShard
from aioffload.model.layout import LayerLayout


def slice_shape(entry: TensorEntry, sl: Slice) -> tuple[int, ...]:
    shape = list(entry.shape)
    shape[sl.dim] = sl.hi - sl.lo
    return tuple(shape)


def read_slice_into(entry: TensorEntry, out: torch.Tensor, sl: Slice) -> None:
    """Fill the CPU tensor `out` (numel of the slice) with rows (dim 0) or columns (dim 1) [lo, hi)
    of the entry, converting dtype if needed."""
    shape = slice_shape(entry, sl)
    if out.dtype != entry.dtype or not out.is_contiguous():
        tmp = torch.empty(shape, dtype=entry.dtype)
        read_slice_into(entry, tmp, sl)
        out.copy_(tmp.view(out.shape))
        return
    assert out.numel() == math.prod(shape), f"{out.numel()} elements for a slice of shape {shape}"
    item = entry.dtype.itemsize
    row = math.prod(entry.shape[1:]) * item  # bytes per stored row
    dst = byte_view(out)
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        if sl.dim == 0:
            _pread_all(fd, dst, entry.offset + sl.lo * row, entry)
        else:
            if len(entry.shape) != 2:
                raise SafetensorsError(f"{entry.path.name}: a column slice needs a matrix, not {list(entry.shape)}")
            width = (sl.hi - sl.lo) * item
            for r in range(entry.shape[0]):
                _pread_all(fd, dst[r * width : (r + 1) * width], entry.offset + r * row + sl.lo * item, entry)
    finally:
        os.close(fd)


def _pread_all(fd: int, dst: memoryview, offset: int, entry: TensorEntry) -> None:
    done = 0
    while done < len(dst):
        got = os.preadv(fd, [dst[done:]], offset + done)
        if not got:
            raise SafetensorsError(f"{entry.path.name}: unexpected end of file")
        done += got


def read_shard_into(entry: TensorEntry, name: str, out: torch.Tensor, shard: TPShard) -> int:
    """`shard`'s part of tensor `name` into the front of `out`; returns the elements written."""
    sl = shard.slice_of(name)
    n = math.prod(slice_shape(entry, sl)) if sl is not None else entry.nbytes // entry.dtype.itemsize
    if sl is None:
        read_into(entry, out[:n])
    else:
        read_slice_into(entry, out[:n], sl)
    return n


def read_layer_shard_into(ckpt: Checkpoint, i: int, flat: torch.Tensor, layout: LayerLayout, shard: TPShard) -> None:
    """Decoder layer i's tensors named by `layout` (the rank's own: model/layout.py over the
    sharded ModelConfig) into `flat`, each one's rank slice; alignment gaps are zeroed."""
    ends = [p.offset for p in layout.params[1:]] + [layout.numel]
    for spec, end in zip(layout.params, ends):
        offset = spec.offset
        for src in spec.sources:
            name = f"model.layers.{i}.{src}"
            offset += read_shard_into(ckpt.entries[name], name, flat[offset:end], shard)
        flat[offset:end].zero_()
