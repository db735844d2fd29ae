"""Hugging Face checkpoint folders: validation, and loading into resident or pinned host buffers.

`Checkpoint.open` checks everything it can from headers alone (files, architecture,
every tensor's presence and shape) so bad input fails before any allocation, with a
message naming the file. `read_layer_into` reads one decoder layer straight into a
caller-owned flat buffer (the worker's model assembly decides where that buffer lives);
`read_expert_into` does the same for one routed expert of an MoE layer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aioffload.checkpoint.safetensors_io import SafetensorsError, TensorEntry, read_header, read_into
from aioffload.config import ConfigError, EngineConfig, ModelConfig
from aioffload.model.layout import LayerLayout, expert_layout, layer_layout, source_shapes

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
        for i in range(cfg.num_layers):
            for spec in layer_layout(cfg, i).params:
                for src, shape in zip(spec.sources, source_shapes(cfg, spec), strict=True):
                    expected[f"model.layers.{i}.{src}"] = shape
        if cfg.is_moe:
            self._check_fused_experts()
            for e in range(cfg.num_experts):
                for spec in expert_layout(cfg, e).params:
                    for src, shape in zip(spec.sources, source_shapes(cfg, spec), strict=True):
                        for i in cfg.moe_layers:
                            expected[f"model.layers.{i}.{src}"] = shape
        for name, shape in expected.items():
            entry = self.entries.get(name)
            if entry is None:
                raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
            if entry.shape != shape:
                raise CheckpointError(
                    f"{entry.path.name}: tensor {name} has shape {list(entry.shape)}, expected {list(shape)}"
                )

    def _check_fused_experts(self) -> None:
        """transformers 5 holds experts fused in memory (experts.gate_up_proj [E, 2I, H]) but saves
        them per expert; a folder saved fused is named as such rather than as a missing tensor."""
        fused = next((n for n in self.entries if n.endswith(("experts.gate_up_proj", "experts.down_proj"))), None)
        if fused is not None:
            raise CheckpointError(
                f"{self.entries[fused].path.name}: tensor {fused} holds every expert of a layer fused; aioffload reads "
                "per-expert tensors (experts.{e}.gate_proj/up_proj/down_proj.weight, or w1/w2/w3 for Mixtral), as "
                "save_pretrained writes them"
            )

    @property
    def layout(self) -> LayerLayout:
        """Layer 0's buffer layout (every layer's, for dense models; see `layer_layout(cfg, i)`)."""
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


def read_layer_into(ckpt: Checkpoint, i: int, flat: torch.Tensor, layout: LayerLayout | None = None) -> None:
    """Read decoder layer i's tensors named by `layout` (default `ckpt.layout`: all of them) into
    the flat buffer `flat`. The alignment gaps after each are zeroed, so the buffer is fully
    defined (offloaded buffers are compared bitwise in tests)."""
    layout = layout or ckpt.layout
    ends = [p.offset for p in layout.params[1:]] + [layout.numel]
    for spec, end in zip(layout.params, ends):
        offset = spec.offset
        for src in spec.sources:
            e = ckpt.entries[f"model.layers.{i}.{src}"]
            n = e.nbytes // e.dtype.itemsize
            read_into(e, flat[offset : offset + n])
            offset += n
        flat[offset:end].zero_()


def resolve_max_model_len(config: EngineConfig, ckpt: Checkpoint) -> int:
    """--max-model-len, or min(model limit, 4096); ConfigError when it exceeds the model's limit."""
    limit = ckpt.model_config.max_position_embeddings
    wanted = config.scheduler.max_model_len
    if wanted is None:
        return min(limit, 4096)
    if wanted > limit:
        raise ConfigError(f"--max-model-len {wanted} exceeds the model's max_position_embeddings {limit}")
    return wanted


def read_expert_into(ckpt: Checkpoint, i: int, expert: int, flat: torch.Tensor) -> None:
    """Read routed expert `expert` of MoE layer i (gate | up | down, `expert_layout`) into `flat`."""
    read_layer_into(ckpt, i, flat, expert_layout(ckpt.model_config, expert))
