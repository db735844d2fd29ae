"""Where each weight of a decoder layer lives inside that layer's one flat buffer.

Every decoder layer's weights sit in one contiguous buffer (on the GPU for resident
layers, pinned on the host for offloaded ones, or in a staging slot while streamed).
`LayerWeights` is a set of views into such a buffer, so a layer computes the same way
wherever its bytes came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aioffload.config import ModelConfig

_ALIGN = 128  # elements; keeps every view 256-byte aligned in bf16


@dataclass(frozen=True)
class ParamSpec:
    name: str  # our name, e.g. "qkv_w"
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # HF tensor names (suffixes after "model.layers.{i}."), concatenated on dim 0
    offset: int  # element offset in the flat buffer


@dataclass(frozen=True)
class LayerLayout:
    params: tuple[ParamSpec, ...]
    numel: int  # elements of the flat buffer (with alignment padding)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()


def layer_layout(cfg: ModelConfig) -> LayerLayout:
    h, q, kv, i, d = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.head_dim
    attn = "self_attn."
    items: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = [
        ("input_norm", (h,), ("input_layernorm.weight",)),
        ("qkv_w", (q + 2 * kv, h), tuple(f"{attn}{p}_proj.weight" for p in "qkv")),
    ]
    if cfg.qkv_bias:
        items.append(("qkv_b", (q + 2 * kv,), tuple(f"{attn}{p}_proj.bias" for p in "qkv")))
    if cfg.qk_norm:
        items += [("q_norm", (d,), (f"{attn}q_norm.weight",)), ("k_norm", (d,), (f"{attn}k_norm.weight",))]
    items += [
        ("o_w", (h, q), (f"{attn}o_proj.weight",)),
        ("post_norm", (h,), ("post_attention_layernorm.weight",)),
        ("gate_up_w", (2 * i, h), ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        ("down_w", (h, i), ("mlp.down_proj.weight",)),
    ]
    specs, offset = [], 0
    for name, shape, sources in items:
        specs.append(ParamSpec(name, shape, sources, offset))
        n = 1
        for s in shape:
            n *= s
        offset += -(-n // _ALIGN) * _ALIGN
    return LayerLayout(tuple(specs), offset)


def source_shapes(cfg: ModelConfig, spec: ParamSpec) -> list[tuple[int, ...]]:
    """Expected shape of each HF source tensor of `spec` (they concatenate on dim 0)."""
    if spec.name in ("qkv_w", "qkv_b"):
        rows = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        return [(r, *spec.shape[1:]) for r in rows]
    if spec.name == "gate_up_w":
        return [(cfg.intermediate_size, cfg.hidden_size)] * 2
    return [spec.shape]


class LayerWeights:
    """Named views into one layer's flat buffer. Attributes: input_norm, qkv_w, [qkv_b],
    [q_norm, k_norm], o_w, post_norm, gate_up_w, down_w."""

    qkv_b: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def __init__(self, flat: torch.Tensor, layout: LayerLayout) -> None:
        self.flat = flat  # [numel]
        for p in layout.params:
            n = 1
            for s in p.shape:
                n *= s
            setattr(self, p.name, flat[p.offset : p.offset + n].view(p.shape))
