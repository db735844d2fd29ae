"""Where each weight of a decoder layer lives inside that layer's one flat buffer.

Every decoder layer's weights sit in one contiguous buffer (on the GPU for resident
layers, pinned on the host for offloaded ones, or in a staging slot while streamed).
`LayerWeights` is a set of views into such a buffer, so a layer computes the same way
wherever its bytes came from.

Mixture-of-experts layers keep attention, norms, router and shared expert in that buffer;
each routed expert is a flat buffer of its own (gate | up | down, `expert_layout`), and a
layer's experts stack into [E, numel] tensors that `ExpertWeights` views as [E, 2I, H] and
[E, H, I].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aioffload.config import ModelConfig

_ALIGN = 128  # elements; keeps every view 256-byte aligned in bf16
_Items = list[tuple[str, tuple[int, ...], tuple[str, ...]]]  # (our name, shape, HF sources)


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


def layer_layout(cfg: ModelConfig, layer: int = 0) -> LayerLayout:
    """Layer `layer`'s buffer; every layer of a dense model has the same one. An MoE layer's holds
    router and shared expert in place of the dense MLP (its routed experts: `expert_layout`)."""
    h, q, kv, i, d = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.head_dim
    attn = "self_attn."
    items: _Items = [
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
    ]
    if layer in cfg.moe_layers:
        items += _moe_items(cfg)
    else:
        items += [
            ("gate_up_w", (2 * i, h), ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
            ("down_w", (h, i), ("mlp.down_proj.weight",)),
        ]
    return _pack(items)


def _moe_prefix(cfg: ModelConfig) -> str:
    return "block_sparse_moe." if cfg.architecture == "MixtralForCausalLM" else "mlp."


def _moe_items(cfg: ModelConfig) -> _Items:
    h, s, m = cfg.hidden_size, cfg.shared_expert_intermediate_size, _moe_prefix(cfg)
    items: _Items = [("router_w", (cfg.num_experts, h), (f"{m}gate.weight",))]
    if s:
        shared = f"{m}shared_expert."
        items += [
            ("shared_gate_up_w", (2 * s, h), (f"{shared}gate_proj.weight", f"{shared}up_proj.weight")),
            ("shared_down_w", (h, s), (f"{shared}down_proj.weight",)),
            ("shared_gate_w", (1, h), (f"{m}shared_expert_gate.weight",)),
        ]
    return items


def expert_layout(cfg: ModelConfig, expert: int | str = "{e}") -> LayerLayout:
    """One routed expert's flat buffer: gate_up_w [2I, H] (gate rows, then up rows), down_w [H, I].
    Every expert's is the same; `expert` only names the HF sources (suffixes after "model.layers.{i}.")."""
    h, i, m = cfg.hidden_size, cfg.moe_intermediate_size, _moe_prefix(cfg)
    if cfg.architecture == "MixtralForCausalLM":  # w1 = gate, w3 = up, w2 = down
        gate, up, down = (f"{m}experts.{expert}.{w}.weight" for w in ("w1", "w3", "w2"))
    else:
        gate, up, down = (f"{m}experts.{expert}.{p}_proj.weight" for p in ("gate", "up", "down"))
    return _pack([("gate_up_w", (2 * i, h), (gate, up)), ("down_w", (h, i), (down,))])


def _pack(items: _Items) -> LayerLayout:
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
    if spec.name.endswith("gate_up_w"):  # dense, shared or routed expert: gate rows, then up rows
        return [(spec.shape[0] // 2, spec.shape[1])] * 2
    return [spec.shape]


class LayerWeights:
    """Named views into one layer's flat buffer. Attributes: input_norm, qkv_w, [qkv_b],
    [q_norm, k_norm], o_w, post_norm, then gate_up_w, down_w (dense MLP) or router_w
    [E, H] and, with a shared expert, shared_gate_up_w, shared_down_w, shared_gate_w [1, H]."""

    qkv_b: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    router_w: torch.Tensor | None = None
    shared_gate_up_w: torch.Tensor | None = None
    shared_down_w: torch.Tensor | None = None
    shared_gate_w: torch.Tensor | None = None

    def __init__(self, flat: torch.Tensor, layout: LayerLayout) -> None:
        self.flat = flat  # [numel]
        for p in layout.params:
            n = 1
            for s in p.shape:
                n *= s
            setattr(self, p.name, flat[p.offset : p.offset + n].view(p.shape))


class ExpertWeights:
    """A stack of routed experts, [N, numel] laid out as `expert_layout`, viewed per matrix:
    gate_up_w [N, 2I, H] and down_w [N, H, I]. Row n is expert n of its layer wherever the
    stack lives (resident, a staging slot), so the grouped GEMM is the same for all of them."""

    def __init__(self, stacked: torch.Tensor, layout: LayerLayout) -> None:
        for p in layout.params:
            n = 1
            for s in p.shape:
                n *= s
            setattr(self, p.name, stacked[:, p.offset : p.offset + n].unflatten(1, p.shape))
