"""Mixture-of-experts MLPs: Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE.

`MoeMlp` plugs into the decoder's per-layer MLP seam. For a sparse layer: router logits
-> float32 softmax -> top-k (renormalised when the model says so), exactly as
transformers computes them; the tokens' (token, expert) pairs are sorted by expert and
each expert's rows go through one grouped GEMM over the layer's [E, ...] expert stack.
Dense layers of mixed models (mlp_only_layers, decoder_sparse_step) use the dense MLP.

The expert stack comes from an `ExpertSource` once the step's per-expert token counts are
known: resident experts hand out their stack, the expert stream (offload/expert_stream.py)
a staging slot holding at least the routed experts. Row e is expert e either way, so the
rows, offsets and GEMMs are the same, and offloaded output is bit-identical to resident.
"""

from __future__ import annotations

import types
from typing import Protocol

import torch
import torch.nn.functional as F

from aioffload.config import ModelConfig
from aioffload.model import ops as torch_ops
from aioffload.model.layout import ExpertWeights, LayerLayout, LayerWeights
from aioffload.model.llama import DenseMlp


class ExpertSource(Protocol):
    """Hands out an MoE layer's expert stack for the duration of its expert GEMMs."""

    def begin_step(self, num_tokens: int) -> None: ...

    def acquire(self, layer: int, counts: torch.Tensor) -> ExpertWeights: ...  # counts: [E] int32 rows per expert

    def release(self, layer: int) -> None: ...


def route(
    logits: torch.Tensor,  # [T, E] in the model dtype
    top_k: int,
    normalize: bool,
    fp32_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k], expert ids [T, k] int64
    """transformers' TopKRouter: softmax in float32, top-k, optional renormalisation; Qwen casts
    the weights back to the model dtype, Mixtral keeps them in float32."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if fp32_weights else weights.to(logits.dtype)), idx


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:  # [T, k] -> [E] int32
    """Rows routed to each expert; a scatter-add, so no host sync (CUDA graphs stay possible)."""
    flat = idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=idx.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] of x times w[g]^T: x [N, in], w [G, out, in], offs [G] int32 (cumulative).
    `grouped`: one torch._grouped_mm; else a loop of F.linear over non-empty groups (host-side offsets)."""
    if grouped:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[g])
        start = end
    return out


def grouped_mm_works(device: torch.device, dtype: torch.dtype, layout: LayerLayout) -> bool:
    """Whether torch._grouped_mm runs here on expert stacks laid out as `layout` (CUDA wants bf16 on
    sm90+ and 16-byte aligned strides; the CPU has a fallback from torch 2.9). Probed once, at model
    assembly, on the same strided [E, out, in] views the layers use."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        ew = ExpertWeights(torch.zeros(2, layout.numel, dtype=dtype, device=device), layout)
        offs = torch.tensor([1, 4], dtype=torch.int32, device=device)
        x = torch.zeros(4, ew.gate_up_w.shape[2], dtype=dtype, device=device)
        grouped_linear(torch_ops.silu_mul(grouped_linear(x, ew.gate_up_w, offs, True)), ew.down_w, offs, True)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def run_experts(
    h: torch.Tensor,  # [T, H]
    idx: torch.Tensor,  # [T, k] expert ids
    weights: torch.Tensor,  # [T, k]
    counts: torch.Tensor,  # [E] int32
    ew: ExpertWeights,  # gate_up_w [E, 2I, H], down_w [E, H, I]
    ops: types.ModuleType,
    grouped: bool,
) -> torch.Tensor:  # [T, H]
    t, k = idx.shape
    order = torch.argsort(idx.reshape(-1), stable=True)  # [T*k]: pairs grouped by expert, token order within
    offs = counts.cumsum(0, dtype=torch.int32)  # [E]
    x = h[order // k]  # [T*k, H]
    y = grouped_linear(ops.silu_mul(grouped_linear(x, ew.gate_up_w, offs, grouped)), ew.down_w, offs, grouped)
    y = torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1)  # back to (token, choice) order
    # Each pair scaled by its router weight (Mixtral's in float32, then rounded), summed in choice order.
    return (y * weights.unsqueeze(-1)).to(h.dtype).sum(dim=1)


class MoeMlp:
    """The Mlp of an MoE model: sparse layers route, the rest (mlp_only_layers) stay dense.
    `router_logit_bias` ([num_layers, E], None in serving) lets benchmarks skew the routing."""

    def __init__(self, cfg: ModelConfig, ops: types.ModuleType, experts: ExpertSource, grouped: bool) -> None:
        self.cfg = cfg
        self.ops = ops
        self.experts = experts
        self.grouped = grouped
        self.dense = DenseMlp(ops)
        self.moe_layers = frozenset(cfg.moe_layers)
        self.first_moe_layer = cfg.moe_layers[0]
        self.router_logit_bias: torch.Tensor | None = None

    def __call__(self, layer: int, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:  # [T, H] -> [T, H]
        if layer not in self.moe_layers:
            return self.dense(layer, h, w)
        cfg = self.cfg
        if layer == self.first_moe_layer:
            self.experts.begin_step(h.shape[0])
        logits = F.linear(h, w.router_w)  # [T, E]
        if self.router_logit_bias is not None:
            logits = logits + self.router_logit_bias[layer].to(logits.dtype)
        weights, idx = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router_weights_fp32)
        counts = expert_counts(idx, cfg.num_experts)
        ew = self.experts.acquire(layer, counts)
        out = run_experts(h, idx, weights, counts, ew, self.ops, self.grouped)
        self.experts.release(layer)
        if w.shared_gate_up_w is not None:
            shared = F.linear(self.ops.silu_mul(F.linear(h, w.shared_gate_up_w)), w.shared_down_w)  # [T, H]
            out = out + torch.sigmoid(F.linear(h, w.shared_gate_w)) * shared
        return out
