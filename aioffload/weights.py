"""Hugging Face checkpoint folders: validation, and loading into resident or pinned host buffers.

`Checkpoint.open` checks everything it can from headers alone (files, architecture,
every tensor's presence and shape) so bad input fails before any allocation, with a
message naming the file. `load_weights` then reads each decoder layer straight into
its final flat buffer: a GPU buffer for resident layers, a pinned host buffer for
offloaded ones (DESIGN.md section 3).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aioffload.config import ConfigError, ModelConfig
from aioffload.model.layout import LayerLayout, LayerWeights, layer_layout, source_shapes
from aioffload.pinned import pinned_empty
from aioffload.progress import Progress
from aioffload.safetensors_io import SafetensorsError, TensorEntry, read_header, read_into

log = logging.getLogger("aioffload.weights")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A problem with the model folder; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_config: ModelConfig
    entries: dict[str, TensorEntry] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: model folder does not exist")
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (every model folder needs a config.json)")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
        gen = root / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{gen}: not valid JSON ({e})") from e
            if eos is not None:
                raw = {**raw, "eos_token_id": eos}
        try:
            mcfg = ModelConfig.from_hf(raw, source=str(cfg_path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        entries = _read_entries(root)
        ckpt = cls(root, mcfg, entries)
        ckpt._check_tensors()
        return ckpt

    def _check_tensors(self) -> None:
        cfg = self.model_config
        expected: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
            "model.norm.weight": (cfg.hidden_size,),
        }
        if not (cfg.tie_word_embeddings and "lm_head.weight" not in self.entries):
            expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
        for spec in self.layout.params:
            for src, shape in zip(spec.sources, source_shapes(cfg, spec), strict=True):
                for i in range(cfg.num_layers):
                    expected[f"model.layers.{i}.{src}"] = shape
        for name, shape in expected.items():
            entry = self.entries.get(name)
            if entry is None:
                raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
            if entry.shape != shape:
                raise CheckpointError(
                    f"{entry.path.name}: tensor {name} has shape {list(entry.shape)}, expected {list(shape)}"
                )

    @property
    def layout(self) -> LayerLayout:
        return layer_layout(self.model_config)

    def resolve_dtype(self, requested: str, device: torch.device) -> torch.dtype:
        """auto = the checkpoint's dtype on CUDA, float32 on the CPU (half precision is slow there)."""
        if requested != "auto":
            return _DTYPES[requested]
        if device.type != "cuda":
            return torch.float32
        return _DTYPES.get(self.model_config.checkpoint_dtype, torch.bfloat16)


def _read_entries(root: Path) -> dict[str, TensorEntry]:
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        p = root / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in model.safetensors.index.json)")
        try:
            entries.update(read_header(p))
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
    return entries


@dataclass
class LoadedWeights:
    layout: LayerLayout
    embed: torch.Tensor  # [V, H], on the device, or on the host when embed_on_host
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    resident: dict[int, LayerWeights]  # layer -> views into a device buffer
    host: dict[int, torch.Tensor]  # layer -> flat pinned host buffer (offloaded layers)


def load_weights(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    offloaded: frozenset[int] = frozenset(),
    embed_on_host: bool = False,
) -> LoadedWeights:
    """Read every tensor once into its final place. Offloaded layers go to pinned host memory
    (plain host memory on a CPU-only machine), everything else to `device`."""
    cfg, layout = ckpt.model_config, ckpt.layout
    pin = device.type == "cuda"
    layer_bytes = layout.nbytes(dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    total = cfg.num_layers * layer_bytes + 2 * cfg.vocab_size * cfg.hidden_size * elem
    progress = Progress("loading weights", total, unit_scale=1e9, unit="GB")
    t0 = time.perf_counter()

    def load(name: str, dev: torch.device) -> torch.Tensor:
        e = ckpt.entries[name]
        host = torch.empty(e.shape, dtype=dtype)
        read_into(e, host)
        progress.advance(host.numel() * elem)
        return host.to(dev)

    embed = load("model.embed_tokens.weight", torch.device("cpu") if embed_on_host else device)
    final_norm = load("model.norm.weight", device)
    if "lm_head.weight" in ckpt.entries:
        lm_head = load("lm_head.weight", device)
    else:
        lm_head = embed if embed.device == device else embed.to(device)

    def host_buffer() -> torch.Tensor:
        return pinned_empty(layout.numel, dtype) if pin else torch.empty(layout.numel, dtype=dtype)

    # Resident layers pass through one reused pinned staging buffer on their way to the GPU.
    staging = host_buffer() if pin and len(offloaded) < cfg.num_layers else None
    resident: dict[int, LayerWeights] = {}
    host: dict[int, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        offload = i in offloaded
        flat = host_buffer() if offload or staging is None else staging
        _fill_layer(ckpt, i, flat, layout)
        if offload:
            host[i] = flat
        else:
            dev_flat = flat.to(device, non_blocking=False) if flat.device != device else flat
            resident[i] = LayerWeights(dev_flat, layout)
        progress.advance(layer_bytes)
    progress.close()
    log.info(
        "loaded %s: %d layers (%d resident, %d offloaded), %s, %.1f GB in %.1f s",
        ckpt.path.name, cfg.num_layers, len(resident), len(host), str(dtype).removeprefix("torch."),
        total / 1e9, time.perf_counter() - t0,
    )  # fmt: skip
    return LoadedWeights(layout, embed, final_norm, lm_head, resident, host)


def _fill_layer(ckpt: Checkpoint, i: int, flat: torch.Tensor, layout: LayerLayout) -> None:
    """Read layer i's tensors into `flat`; the alignment gaps between them are zeroed, so a
    layer's buffer is fully defined (offloaded buffers are compared bitwise in tests)."""
    ends = [p.offset for p in layout.params[1:]] + [layout.numel]
    for spec, end in zip(layout.params, ends):
        offset = spec.offset
        for src in spec.sources:
            e = ckpt.entries[f"model.layers.{i}.{src}"]
            n = e.nbytes // e.dtype.itemsize
            read_into(e, flat[offset : offset + n])
            offset += n
        flat[offset:end].zero_()
