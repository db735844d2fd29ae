"""Expert-granular placement for mixture-of-experts models (DESIGN.md section 9).

Pure arithmetic on byte counts. Everything but the routed experts goes on the GPU first:
embedding, lm_head, final norm, and every layer's attention, norms, router and shared
expert. The trigger (or --cpu-offload-gb) then decides how many routed experts stay
resident, counted in forward order: layer 0's whole expert set, then layer 1's, ...; the
rest stay in pinned host memory and stream per step. Streaming needs `staging_slots`
slots of one expert set each on the GPU (counted with the weights, as the dense ring is),
and an expert cache holds recently streamed experts: --expert-cache-gb, or by default the
memory the KV cache cannot use (beyond max_num_seqs x max_model_len tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aioffload.attention.kv_cache import kv_bytes_per_block
from aioffload.config import CacheConfig, ConfigError, ModelConfig, OffloadConfig, SchedulerConfig
from aioffload.model.layout import expert_layout, layer_layout
from aioffload.offload.placement import HBM_BYTES_PER_S, Placement, _check_trigger
from aioffload.offload.units import gb as _gb
from aioffload.offload.units import span as _span


@dataclass(frozen=True)
class ExpertPlan:
    num_experts: int
    expert_bytes: int  # one routed expert's flat buffer (gate | up | down)
    resident: tuple[tuple[int, int], ...]  # (MoE layer, n): experts 0..n-1 on the GPU, the rest on the host
    staging_slots: int  # GPU slots of num_experts experts each; 0 when nothing streams
    cache_experts: int  # GPU expert cache entries (offloaded experts recently streamed)
    stream_mode: str  # auto | routed | full (--expert-stream)
    h2d_bytes_per_s: float

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, n in self.resident if n < self.num_experts)

    @property
    def offloaded_experts(self) -> int:
        return sum(self.num_experts - n for _, n in self.resident)

    @property
    def staging_bytes(self) -> int:
        return self.staging_slots * self.num_experts * self.expert_bytes

    @property
    def cache_bytes(self) -> int:
        return self.cache_experts * self.expert_bytes


@dataclass(frozen=True)
class _MoeBudget:
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    expert_bytes: int
    fixed_gpu: int  # embedding, lm_head, final norm, every layer's non-expert buffer
    embed_host: int  # embedding bytes kept on the host (0 unless --embed-on-host)
    prefetch: int
    total: int
    utilization: float
    activation_bytes: int
    kv_block_bytes: int
    block_size: int
    h2d: float

    @property
    def all_experts(self) -> int:
        return len(self.moe_layers) * self.num_experts

    def resident_split(self, r: int) -> tuple[tuple[int, int], ...]:
        e = self.num_experts
        return tuple((layer, min(e, max(0, r - j * e))) for j, layer in enumerate(self.moe_layers))

    def staging(self, r: int) -> int:
        streamed = sum(1 for _, n in self.resident_split(r) if n < self.num_experts)
        return min(self.prefetch, streamed) * self.num_experts * self.expert_bytes

    def footprint(self, r: int) -> int:
        return self.fixed_gpu + r * self.expert_bytes + self.staging(r)

    def kv_room(self, r: int, cache_experts: int) -> int:
        free = self.utilization * self.total - self.footprint(r) - cache_experts * self.expert_bytes
        return max(0, math.floor((free - self.activation_bytes) / self.kv_block_bytes))


def plan_expert_placement(
    model: ModelConfig,
    dtype_bytes: int,
    offload: OffloadConfig,
    cache: CacheConfig,
    sched: SchedulerConfig,
    max_model_len: int,
    device_total_bytes: int,
    h2d_bytes_per_s: float,
    activation_bytes: int,
) -> Placement:
    """Placement for an MoE model; ConfigError (saying what to change) when it cannot work."""
    vocab = model.vocab_size * model.hidden_size * dtype_bytes
    tied_shared = model.tie_word_embeddings and not offload.embed_on_host
    non_expert = sum(layer_layout(model, i).numel for i in range(model.num_layers)) * dtype_bytes
    b = _MoeBudget(
        num_layers=model.num_layers,
        moe_layers=model.moe_layers,
        num_experts=model.num_experts,
        expert_bytes=expert_layout(model).numel * dtype_bytes,
        fixed_gpu=(0 if offload.embed_on_host else vocab) + (0 if tied_shared else vocab)
        + model.hidden_size * dtype_bytes + non_expert,
        embed_host=vocab if offload.embed_on_host else 0,
        prefetch=offload.prefetch,
        total=int(device_total_bytes),
        utilization=cache.gpu_memory_utilization,
        activation_bytes=int(activation_bytes),
        kv_block_bytes=kv_bytes_per_block(
            model.num_layers, cache.block_size, model.num_kv_heads, model.head_dim, dtype_bytes
        ),
        block_size=cache.block_size,
        h2d=h2d_bytes_per_s,
    )  # fmt: skip
    trigger, host_gb = offload.trigger, offload.cpu_offload_gb  # both given: refused by plan_placement
    n = b.all_experts
    if host_gb is not None:
        target = round(host_gb * 1e9)
        if target > n * b.expert_bytes:
            raise ConfigError(
                f"--cpu-offload-gb {host_gb:g} is more than all {n} routed experts hold ({_gb(n * b.expert_bytes)}); "
                f"give at most {math.floor(n * b.expert_bytes / 1e7) / 100:g}"
            )
        r = n - -(-target // b.expert_bytes)  # the fewest offloaded experts holding >= target bytes
        why = f"--cpu-offload-gb {host_gb:g}"
    elif trigger == "auto":
        r = _auto_resident(b, max_model_len, sched.max_num_seqs)
        why = "auto"
    else:
        _check_trigger(float(trigger), cache.gpu_memory_utilization)
        r, why = _trigger_resident(b, float(trigger)), f"trigger {float(trigger):g}"
    cache_experts = _cache_experts(b, r, offload.expert_cache_gb, max_model_len, sched.max_num_seqs)
    fixed_trigger = None if host_gb is not None or trigger == "auto" else float(trigger)
    p = _build(b, r, cache_experts, offload, why, fixed_trigger)
    if p.kv_tokens < max_model_len:
        raise _no_room(b, p, max_model_len)
    return p


def _trigger_resident(b: _MoeBudget, trigger: float) -> int:
    if trigger >= 1.0:
        return b.all_experts
    budget = trigger * b.total
    if b.footprint(0) > budget:
        need = math.ceil(b.footprint(0) / b.total * 100) / 100
        raise ConfigError(
            f"MoE placement keeps attention, norms, router and shared experts of every layer, embedding and "
            f"lm_head on the GPU ({_gb(b.fixed_gpu)}) beside {_gb(b.staging(0))} of expert staging: trigger "
            f"{trigger:g} x {_gb(b.total)} = {_gb(budget)} is too small; give --trigger {need:g} or more"
        )
    r = 0
    while r < b.all_experts and b.footprint(r + 1) <= budget:
        r += 1
    return r


def _auto_resident(b: _MoeBudget, max_model_len: int, max_num_seqs: int) -> int:
    """Whole expert sets resident, the count maximising seqs / step for `max_num_seqs` full-length
    sequences, with the step at the copy-everything floor (large batches route to every expert)."""
    best = (-1.0, 0)
    for layers in range(len(b.moe_layers) + 1):
        r = layers * b.num_experts
        seqs = min(max_num_seqs, b.kv_room(r, 0) * b.block_size // max_model_len)
        if seqs >= 1 and b.footprint(r) <= b.utilization * b.total:
            step = max((b.all_experts - r) * b.expert_bytes / b.h2d, b.footprint(r) / HBM_BYTES_PER_S)
            best = max(best, (seqs / step, r))
    return best[1]


def _cache_experts(b: _MoeBudget, r: int, cache_gb: float | None, max_model_len: int, max_num_seqs: int) -> int:
    offloaded = b.all_experts - r
    if offloaded == 0:
        return 0
    if cache_gb is not None:
        return min(offloaded, math.floor(cache_gb * 1e9 / b.expert_bytes))
    wanted_blocks = max_num_seqs * -(-max_model_len // b.block_size)
    spare_blocks = b.kv_room(r, 0) - wanted_blocks
    return max(0, min(offloaded, math.floor(spare_blocks * b.kv_block_bytes / b.expert_bytes)))


def _build(
    b: _MoeBudget, r: int, cache_experts: int, offload: OffloadConfig, why: str, trigger: float | None
) -> Placement:
    split = b.resident_split(r)
    plan = ExpertPlan(
        num_experts=b.num_experts, expert_bytes=b.expert_bytes, resident=split,
        staging_slots=b.staging(r) // (b.num_experts * b.expert_bytes), cache_experts=cache_experts,
        stream_mode=offload.expert_stream, h2d_bytes_per_s=b.h2d,
    )  # fmt: skip
    host = plan.offloaded_experts * b.expert_bytes
    streamed = plan.streamed_layers
    if not streamed:
        reason = f"{why}: offload off, all {b.all_experts} routed experts resident ({_gb(b.footprint(r))})"
    else:
        reason = (
            f"{why}: non-expert weights ({_gb(b.fixed_gpu)}) and {r} of {b.all_experts} routed experts on the GPU; "
            f"{plan.offloaded_experts} experts of {_span(streamed)} ({_gb(host)}) stream from the host through "
            f"{plan.staging_slots} staging slots ({_gb(plan.staging_bytes)}), expert cache {cache_experts} entries"
        )
    if trigger is None:  # --cpu-offload-gb or auto: the trigger reproducing this split
        trigger = 1.0 if not streamed else b.footprint(r) / b.total
    kv_blocks = b.kv_room(r, cache_experts)
    return Placement(
        resident_layers=tuple(i for i in range(b.num_layers) if i not in streamed),
        offloaded_layers=streamed,
        embed_on_host=offload.embed_on_host,
        layer_bytes=b.num_experts * b.expert_bytes,  # one expert set: a staging slot
        gpu_weight_bytes=b.fixed_gpu + r * b.expert_bytes,
        host_weight_bytes=host + b.embed_host,
        ring_bytes=plan.staging_bytes,
        activation_bytes=b.activation_bytes,
        kv_block_bytes=b.kv_block_bytes,
        block_size=b.block_size,
        kv_blocks=kv_blocks,
        device_total_bytes=b.total,
        h2d_bytes_per_s=b.h2d,
        predicted_step_floor_s=host / b.h2d,
        trigger=float(trigger),
        reason=reason,
        experts=plan,
    )


def _no_room(b: _MoeBudget, p: Placement, max_model_len: int) -> ConfigError:
    one_seq = -(-max_model_len // b.block_size) * b.kv_block_bytes
    fixes = []
    for t in (k / 20 for k in range(19, 0, -1)):  # the largest multiple of 0.05 that leaves room
        if t <= b.utilization:
            try:
                r = _trigger_resident(b, t)
            except ConfigError:
                break
            if b.kv_room(r, 0) * b.block_size >= max_model_len:
                fixes.append(f"--trigger {t:g}")
                break
    if p.kv_tokens > 0:
        fixes.append(f"--max-model-len {p.kv_tokens}")
    msg = (
        f"the KV cache gets {p.kv_tokens} tokens after {_gb(p.gpu_weight_bytes)} of weights, {_gb(p.ring_bytes)} of "
        f"expert staging and {_gb(p.activation_bytes)} of activations, fewer than --max-model-len {max_model_len} "
        f"({_gb(one_seq)})"
    )
    return ConfigError(f"{msg}; try {' or '.join(fixes)}" if fixes else f"{msg}; lower --max-model-len")
