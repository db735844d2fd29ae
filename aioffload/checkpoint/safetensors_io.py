"""Reading safetensors files straight into caller-owned buffers.

The format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets), then raw bytes. Reading with `readinto` lets an
offloaded layer's bytes land directly in their final pinned buffer: no intermediate
copy, and host memory stays near the offloaded bytes. The tensor's memory is exposed to
`readinto` through ctypes, not numpy (numpy is not a runtime dependency).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one file's header; raise SafetensorsError naming the file when it is corrupt."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path.name}: not a valid safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise SafetensorsError(f"{path.name}: not a valid safetensors file (header length {n} is impossible)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path.name}: not a valid safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: not a valid safetensors file (header is not an object)")
    entries: dict[str, TensorEntry] = {}
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path.name}: bad header entry for {name!r} ({e!r})") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or data_start + end > size or begin < 0:
            raise SafetensorsError(
                f"{path.name}: tensor {name!r} data [{begin}, {end}) does not fit its shape or the file "
                "(truncated or corrupt file)"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, end - begin)
    return entries


def read_into(entry: TensorEntry, out: torch.Tensor) -> None:
    """Fill the CPU tensor `out` (same numel) with the entry's data, converting dtype if needed."""
    if out.dtype == entry.dtype and out.is_contiguous():
        _readinto_bytes(entry, out)
    else:
        tmp = torch.empty(entry.shape, dtype=entry.dtype)
        _readinto_bytes(entry, tmp)
        out.copy_(tmp.view(out.shape))


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.dtype)
    _readinto_bytes(entry, out)
    return out


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable view of the bytes of the contiguous CPU tensor `t` (pinned or not), for `readinto`.

    The view does not keep `t` alive: use it while `t` is referenced."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"byte_view needs a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def _readinto_bytes(entry: TensorEntry, out: torch.Tensor) -> None:
    if entry.nbytes == 0:
        return
    view = byte_view(out)
    with open(entry.path, "rb", buffering=0) as f:
        f.seek(entry.offset)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done : entry.nbytes])
            if not got:
                raise SafetensorsError(f"{entry.path.name}: unexpected end of file")
            done += got
