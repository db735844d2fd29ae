#!/usr/bin/env python
"""Write an HF Llama checkpoint folder whose safetensors files have real headers but sparse data.

    python scripts/make_header_checkpoint.py DIR --shape llama3-8b

Each shard is the 8-byte header length, the JSON header, then `truncate` to its full size:
the data reads back as zeros and costs no disk (16 GB of llama3-8b bf16 take a few kB). That
is enough for everything that reads headers alone — `aioffload plan`, Checkpoint.open's
validation — without generating or storing weights. The layout (shards of 4 decoder layers,
embedding in the first, norm and lm_head in the last, model.safetensors.index.json) and
config.json are those of aioffload.bench.synthetic for the same shape, so a plan made here
is the plan of the synthetic benchmark checkpoint.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: `python scripts/...`
from aioffload.bench.synthetic import SHAPES, _shard_plan, hf_config  # noqa: E402

_ST_DTYPES = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}


def write_header_only(path: Path, tensors: dict[str, tuple[int, ...]], st_dtype: str, itemsize: int) -> int:
    """One safetensors file with a real header and a sparse data section; returns its data bytes."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):  # safetensors' own writer orders by name within one dtype
        n = itemsize
        for s in tensors[name]:
            n *= s
        header[name] = {"dtype": st_dtype, "shape": list(tensors[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def make_header_checkpoint(root: Path, shape: str, dtype_name: str = "bfloat16") -> int:
    dtype, st_dtype = _ST_DTYPES[dtype_name]
    cfg = hf_config(shape, dtype)
    root.mkdir(parents=True, exist_ok=True)
    shards = _shard_plan(cfg)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_header_only(root / name, shard, st_dtype, dtype.itemsize)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (root / "generation_config.json").write_text(json.dumps(gen_cfg, indent=1))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="folder to write (created; existing shards are overwritten)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(_ST_DTYPES), default="bfloat16", help="(default: %(default)s)")
    args = p.parse_args(argv)
    total = make_header_checkpoint(args.dir, args.shape, args.dtype)
    print(f"{args.dir}: {args.shape} {args.dtype}, {total / 1e9:.2f} GB of sparse tensor data (headers only on disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
