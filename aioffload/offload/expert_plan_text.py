"""`aioffload plan` for an MoE model: where each layer's routed experts live, totals and floors."""

from __future__ import annotations

from aioffload.config import ModelConfig
from aioffload.model.layout import expert_layout, layer_layout
from aioffload.offload.placement import Placement
from aioffload.offload.units import gb as _gb
from aioffload.offload.units import size as _size
from aioffload.offload.units import span as _span


def format_expert_plan(p: Placement, model: ModelConfig, block_size: int) -> str:
    """What `aioffload plan` prints for an MoE model: where each layer's experts live, then totals
    and the two step floors (copy every offloaded expert; copy only batch 1's routed ones)."""
    plan = p.experts
    assert plan is not None
    e, eb = plan.num_experts, plan.expert_bytes
    elem = eb // expert_layout(model).numel
    vocab = model.vocab_size * model.hidden_size * elem
    non_expert = sum(layer_layout(model, i).numel for i in range(model.num_layers)) * elem
    rows = [("embed_tokens", "host" if p.embed_on_host else "GPU", "", _size(vocab))]
    what = "attention, norms, router" + (", shared expert" if model.shared_expert_intermediate_size else "")
    dense = [i for i in range(model.num_layers) if i not in model.moe_layers]
    rows.append((_span(range(model.num_layers)), "GPU", what + (" / dense MLP" if dense else ""), _size(non_expert)))
    runs: list[tuple[list[int], int]] = []  # consecutive MoE layers with the same split
    for layer, n in plan.resident:
        if runs and runs[-1][1] == n and runs[-1][0][-1] + 1 == layer:
            runs[-1][0].append(layer)
        else:
            runs.append(([layer], n))
    for layers, n in runs:
        place, what = ("GPU", f"{e} experts") if n == e else ("host", f"{e} experts") if n == 0 else (
            "split", f"{n} GPU + {e - n} host experts")  # fmt: skip
        rows.append((_span(layers), place, f"{what} x {_size(eb)}", _size(len(layers) * e * eb)))
    rows.append(("final norm", "GPU", "", _size(model.hidden_size * elem)))
    tied = model.tie_word_embeddings and not p.embed_on_host
    rows.append(("lm_head", "GPU", "tied", "shares embed_tokens") if tied else ("lm_head", "GPU", "", _size(vocab)))
    lines = [f"  {a:<14} {b:<5} {c:<32} {d:>10}".rstrip() for a, b, c, d in rows]
    k = model.num_experts_per_tok
    routed = sum(k * (e - n) / e for _, n in plan.resident) * eb  # batch 1: k experts per layer, uniform
    bw = p.h2d_bytes_per_s
    resident_experts = len(plan.resident) * e - plan.offloaded_experts
    lines += [
        f"GPU weights      {_gb(p.gpu_weight_bytes)} (non-expert weights + {resident_experts} routed experts)",
        f"host weights     {_gb(p.host_weight_bytes)} (pinned; {plan.offloaded_experts} experts of "
        f"{len(plan.streamed_layers)} layers)",
        f"expert staging   {_gb(plan.staging_bytes)} ({plan.staging_slots} slots of {e} experts)",
        f"expert cache     {_gb(plan.cache_bytes)} ({plan.cache_experts} experts; streaming {plan.stream_mode})",
        f"activations      {_gb(p.activation_bytes)} reserved",
        f"KV cache         {p.kv_blocks} blocks x {block_size} tokens = {p.kv_tokens} tokens "
        f"({_gb(p.kv_blocks * p.kv_block_bytes)})",
        f"device           {_gb(p.device_total_bytes)}",
    ]
    if p.offload_active:
        lines += [
            f"step floor       {p.predicted_step_floor_s * 1e3:.1f} ms copying every offloaded expert "
            f"({_gb(plan.offloaded_experts * eb)} at {bw / 1e9:.1f} GB/s host->GPU)",
            f"routed floor     {routed / bw * 1e3:.1f} ms at batch 1 (top-{k} of {e} per layer: {_gb(routed)})",
        ]
    else:
        lines.append("step floor       no offload: step bound by HBM")
    lines += [
        f"trigger          {'1.0 (offload off)' if p.trigger >= 1.0 else f'{p.trigger:.3g}'}",
        f"reason           {p.reason}",
    ]
    return "\n".join(lines)
