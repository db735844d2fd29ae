"""Placement: which weights live on the GPU and which stream from pinned host memory.

DESIGN.md section 3. Pure arithmetic on byte counts; nothing is allocated here. Weights
go on the GPU in forward order (embedding, final norm, lm_head, then decoder layers
0, 1, 2 ...) while they (plus the prefetch ring, once any layer is offloaded) stay under
`trigger x device_total_bytes`; the rest of the layers stream from the host each step.
The KV cache then takes what is left up to `gpu_memory_utilization x device_total_bytes`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aioffload.attention.kv_cache import kv_bytes_per_block
from aioffload.config import CacheConfig, ConfigError, ModelConfig, OffloadConfig, SchedulerConfig
from aioffload.model.layout import layer_layout
from aioffload.offload.advice import fixed_pool_too_small, no_room
from aioffload.offload.units import duration as _duration
from aioffload.offload.units import gb as _gb
from aioffload.offload.units import size as _size
from aioffload.offload.units import span as _span

if TYPE_CHECKING:
    from aioffload.offload.expert_placement import ExpertPlan

HBM_BYTES_PER_S = 3.0e12  # device-memory bandwidth assumed by trigger "auto" (H100/H200 class)
_WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class Placement:
    resident_layers: tuple[int, ...]  # on the GPU, forward order
    offloaded_layers: tuple[int, ...]  # pinned host, streamed each step (a contiguous tail)
    embed_on_host: bool
    layer_bytes: int  # one decoder layer's flat buffer
    gpu_weight_bytes: int  # resident layers + embed (unless on host) + lm_head (unless shared) + final norm
    host_weight_bytes: int  # offloaded layers (+ embed when on host)
    ring_bytes: int  # staging slots x layer_bytes; 0 when nothing is offloaded
    activation_bytes: int  # reserve for activations / workspace
    kv_block_bytes: int
    kv_blocks: int
    block_size: int
    device_total_bytes: int  # the card's memory, or --gpu-memory-gb x 1e9
    h2d_bytes_per_s: float
    predicted_step_floor_s: float  # streamed layer bytes per decode step / h2d bandwidth
    trigger: float  # the trigger in force (auto / --cpu-offload-gb: the equivalent one)
    reason: str  # one sentence for the startup log
    # MoE models (offload/expert_placement.py): non-expert weights all resident, routed experts split
    # per layer; offloaded_layers are then the layers with streamed experts, layer_bytes one expert set.
    experts: ExpertPlan | None = None

    @property
    def offload_active(self) -> bool:
        return bool(self.offloaded_layers)

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    @property
    def host_layer_bytes(self) -> int:
        return len(self.offloaded_layers) * self.layer_bytes

    @property
    def ring_slots(self) -> int:
        return self.ring_bytes // self.layer_bytes if self.layer_bytes else 0


def estimate_activation_bytes(
    model: ModelConfig, dtype_bytes: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """Conservative reserve for one step of `max_num_batched_tokens` tokens.

    tokens x (4 x hidden          residual, normed input, attention output, MLP output
              + (q + 2 x kv)      fused qkv projection
              + 2 x intermediate) fused gate_up projection
           x dtype_bytes x 2      two such sets alive at once (inputs and outputs of a matmul)
    + max_num_seqs x vocab x 4 x 2   fp32 logits and a sampling copy of them
    + 256 MiB                        allocator slack, attention and matmul workspace
    """
    per_token = 4 * model.hidden_size + model.q_size + 2 * model.kv_size + 2 * model.intermediate_size
    logits = max_num_seqs * model.vocab_size * 4 * 2
    return max_num_batched_tokens * per_token * dtype_bytes * 2 + logits + _WORKSPACE_BYTES


@dataclass(frozen=True)
class _Budget:
    """The fixed byte figures one plan is built from; `build(r)` places r resident layers."""

    num_layers: int
    layer_bytes: int
    embed_bytes: int
    lm_head_bytes: int  # 0 when tied to a resident embedding (shared)
    norm_bytes: int
    embed_on_host: bool
    prefetch: int
    total: int
    utilization: float
    activation_bytes: int
    kv_block_bytes: int
    block_size: int
    h2d: float
    hbm: float
    fixed_kv_blocks: int | None = None  # a KV pool of this size whatever memory is left (CPU, --num-kv-blocks)
    predict_throughput: bool = True  # False on the CPU: auto names no tok/s figure it cannot back
    reserve_per_token: int = 0  # activation bytes per batched token, when the reserve is the estimate (advice)
    reserve_tokens: int = 0  # the batched tokens that estimate is for

    @property
    def usable(self) -> float:
        return self.utilization * self.total

    def ring(self, resident: int) -> int:
        # The transfer queue allocates min(prefetch, offloaded layers) slots.
        return min(self.prefetch, self.num_layers - resident) * self.layer_bytes

    def gpu_weights(self, resident: int) -> int:
        embed = 0 if self.embed_on_host else self.embed_bytes
        return embed + self.lm_head_bytes + self.norm_bytes + resident * self.layer_bytes

    def footprint(self, resident: int) -> int:
        return self.gpu_weights(resident) + self.ring(resident)

    def resident_for_trigger(self, trigger: float) -> int:
        """Layers 0, 1, ... while weights (+ ring) stay <= trigger x total (footprint is monotone)."""
        budget = trigger * self.total
        r = 0
        while r < self.num_layers and self.footprint(r + 1) <= budget:
            r += 1
        return r

    def build(self, resident: int, trigger: float | None = None, reason: str = "") -> Placement:
        L, lb = self.num_layers, self.layer_bytes
        gpu, ring = self.gpu_weights(resident), self.ring(resident)
        free = self.usable - gpu - ring - self.activation_bytes
        kv_blocks = max(0, math.floor(free / self.kv_block_bytes))
        host_layers = (L - resident) * lb
        if trigger is None:  # the trigger that reproduces this split
            trigger = 1.0 if resident == L else self.footprint(resident) / self.total
        return Placement(
            resident_layers=tuple(range(resident)),
            offloaded_layers=tuple(range(resident, L)),
            embed_on_host=self.embed_on_host,
            layer_bytes=lb,
            gpu_weight_bytes=gpu,
            host_weight_bytes=host_layers + (self.embed_bytes if self.embed_on_host else 0),
            ring_bytes=ring,
            activation_bytes=self.activation_bytes,
            kv_block_bytes=self.kv_block_bytes,
            kv_blocks=kv_blocks,
            block_size=self.block_size,
            device_total_bytes=self.total,
            h2d_bytes_per_s=self.h2d,
            predicted_step_floor_s=host_layers / self.h2d,
            trigger=float(trigger),
            reason=reason,
        )


def plan_placement(
    model: ModelConfig,
    dtype_bytes: int,
    offload: OffloadConfig,
    cache: CacheConfig,
    sched: SchedulerConfig,
    max_model_len: int,
    device_total_bytes: int,
    h2d_bytes_per_s: float,
    activation_bytes: int | None = None,
    hbm_bytes_per_s: float = HBM_BYTES_PER_S,
    fixed_kv_blocks: int | None = None,
    predict_throughput: bool = True,
) -> Placement:
    """Place weights per DESIGN.md section 3; raise ConfigError (saying what to change) when the
    plan leaves no KV room for one `max_model_len` sequence.

    `fixed_kv_blocks`: the KV pool has this many blocks whatever memory is left (the CPU's
    --cpu-kv-cache-gb, or --num-kv-blocks); the memory check still applies to the weights.
    `predict_throughput=False` (the CPU): trigger auto states no tokens/s figure."""
    per_token = 0
    if activation_bytes is None:
        activation_bytes = estimate_activation_bytes(
            model, dtype_bytes, sched.max_num_batched_tokens, sched.max_num_seqs
        )
        per_token = estimate_activation_bytes(model, dtype_bytes, 1, 0) - _WORKSPACE_BYTES
    trigger, host_gb = offload.trigger, offload.cpu_offload_gb
    if host_gb is not None and trigger != 1.0:
        raise ConfigError("--cpu-offload-gb and --trigger both say how much to offload: give only one")
    if model.is_moe:
        from aioffload.offload.expert_placement import plan_expert_placement

        p = plan_expert_placement(
            model, dtype_bytes, offload, cache, sched, max_model_len, device_total_bytes, h2d_bytes_per_s,
            activation_bytes,
        )  # fmt: skip
    else:
        p = _plan_dense(model, dtype_bytes, offload, cache, sched, max_model_len, device_total_bytes, h2d_bytes_per_s,
                        hbm_bytes_per_s, activation_bytes, per_token, predict_throughput, fixed_kv_blocks)  # fmt: skip
    if fixed_kv_blocks is not None:  # dense and MoE alike: the pool the flag fixes, checked against one sequence
        p = dataclasses.replace(p, kv_blocks=fixed_kv_blocks)
        if p.kv_tokens < max_model_len:
            block_bytes = kv_bytes_per_block(model.num_layers, cache.block_size, model.num_kv_heads, model.head_dim,
                                             dtype_bytes)  # fmt: skip
            raise fixed_pool_too_small(cache, fixed_kv_blocks, max_model_len, block_bytes)
    return p


def _plan_dense(
    model: ModelConfig, dtype_bytes: int, offload: OffloadConfig, cache: CacheConfig, sched: SchedulerConfig,
    max_model_len: int, device_total_bytes: float, h2d_bytes_per_s: float, hbm_bytes_per_s: float,
    activation_bytes: float, per_token: int, predict_throughput: bool, fixed_kv_blocks: int | None,
) -> Placement:  # fmt: skip
    vocab_bytes = model.vocab_size * model.hidden_size * dtype_bytes
    b = _Budget(
        num_layers=model.num_layers,
        layer_bytes=layer_layout(model).numel * dtype_bytes,
        embed_bytes=vocab_bytes,
        lm_head_bytes=0 if model.tie_word_embeddings and not offload.embed_on_host else vocab_bytes,
        norm_bytes=model.hidden_size * dtype_bytes,
        embed_on_host=offload.embed_on_host,
        prefetch=offload.prefetch,
        total=int(device_total_bytes),
        utilization=cache.gpu_memory_utilization,
        activation_bytes=int(activation_bytes),
        kv_block_bytes=kv_bytes_per_block(
            model.num_layers, cache.block_size, model.num_kv_heads, model.head_dim, dtype_bytes
        ),
        block_size=cache.block_size,
        h2d=h2d_bytes_per_s,
        hbm=hbm_bytes_per_s,
        fixed_kv_blocks=fixed_kv_blocks,  # trigger auto scores splits by this pool; the caller applies it
        predict_throughput=predict_throughput,
        reserve_per_token=per_token,
        reserve_tokens=sched.max_num_batched_tokens,
    )
    trigger, host_gb, util = offload.trigger, offload.cpu_offload_gb, cache.gpu_memory_utilization
    if trigger != "auto" and host_gb is None:
        _check_trigger(float(trigger), util)
    p = _place(b, offload, max_model_len, sched.max_num_seqs)
    if p.kv_tokens < max_model_len:
        raise no_room(b, p, offload, max_model_len)
    if trigger == "auto":
        _check_trigger(p.trigger, util)  # a valid plan is always below; stated for the record
    return p


def _place(b: _Budget, offload: OffloadConfig, max_model_len: int, max_num_seqs: int) -> Placement:
    """The split the offload flags ask for (KV blocks from memory; validity is the caller's)."""
    if offload.trigger == "auto":
        return _plan_auto(b, max_model_len, max_num_seqs)
    if offload.cpu_offload_gb is not None:
        return _plan_host_gb(b, offload.cpu_offload_gb)
    return _plan_trigger(b, float(offload.trigger))


def _check_trigger(trigger: float, util: float) -> None:
    if 1.0 > trigger > util:
        raise ConfigError(
            f"--trigger {trigger:.3g} is above --gpu-memory-utilization {util:g}: "
            "weights would leave no room for the KV cache; lower the trigger"
        )


def _plan_trigger(b: _Budget, trigger: float) -> Placement:
    L = b.num_layers
    if trigger >= 1.0:
        return b.build(L, 1.0, f"trigger 1.0: offload off, all {L} layers resident ({_gb(b.gpu_weights(L))})")
    r = b.resident_for_trigger(trigger)
    head = f"trigger {trigger:g} x {_gb(b.total)} = {_gb(trigger * b.total)} for weights"
    if r == L:
        return b.build(L, trigger, f"{head} holds all {L} layers ({_gb(b.gpu_weights(L))}); none offloaded")
    reason = (
        f"{head}: {r} of {L} layers fit beside a {b.ring(r) // b.layer_bytes}-slot prefetch ring "
        f"({_gb(b.ring(r))}); {_span(range(r, L))} ({_gb((L - r) * b.layer_bytes)}) stream from the host"
    )
    return b.build(r, trigger, reason)


def _plan_host_gb(b: _Budget, host_gb: float) -> Placement:
    L, lb = b.num_layers, b.layer_bytes
    target = round(host_gb * 1e9)
    if target > L * lb:
        raise ConfigError(
            f"--cpu-offload-gb {host_gb:g} is more than all {L} decoder layers hold ({_gb(L * lb)}); "
            f"give at most {math.floor(L * lb / 1e7) / 100:g}"
        )
    r = L - -(-target // lb)  # the smallest tail holding >= target bytes
    if r == L:
        return b.build(L, 1.0, f"--cpu-offload-gb {host_gb:g}: nothing offloaded, all {L} layers resident")
    reason = (
        f"--cpu-offload-gb {host_gb:g}: {_span(range(r, L))} ({_gb((L - r) * lb)}) stay on the host, "
        f"{r} of {L} resident"
    )
    return b.build(r, None, reason)


def _plan_auto(b: _Budget, max_model_len: int, max_num_seqs: int) -> Placement:
    """Pick the resident count maximising seqs / step for `max_num_seqs` full-length sequences;
    a step costs at least the copy floor and one read of the GPU's weights at `b.hbm`."""
    pool = None if b.fixed_kv_blocks is None else b.fixed_kv_blocks * b.block_size
    scored = []  # (tok/s, resident, seqs, step_s)
    for r in range(b.num_layers + 1):
        p = b.build(r)
        if p.kv_tokens < max_model_len:  # no memory left for one sequence's KV
            continue
        seqs = min(max_num_seqs, (p.kv_tokens if pool is None else pool) // max_model_len)
        if seqs >= 1:
            step = max(p.host_layer_bytes / b.h2d, p.gpu_weight_bytes / b.hbm)
            scored.append((seqs / step, r, seqs, step))
    if not scored:
        return b.build(0, None, "auto: no split leaves KV room for one sequence")  # rejected by the caller
    scored.sort(reverse=True)  # equal throughput: more resident layers first
    tput, r, seqs, step = scored[0]
    reason = f"auto: {r} of {b.num_layers} layers resident -> {seqs} seqs x {max_model_len} tokens"
    if not b.predict_throughput:
        return b.build(r, None, f"{reason} (no tok/s prediction on the CPU: its steps are bound by its compute, "
                                "which the plan does not model)")  # fmt: skip
    reason += f", step >= {_duration(step)}, predicted <= {tput:.0f} tok/s"
    if len(scored) > 1:
        reason += f"; runner-up {scored[1][1]} resident: <= {scored[1][0]:.0f} tok/s"
    return b.build(r, None, reason)


def _trigger_text(p: Placement, stand_in: bool) -> str:
    if p.trigger >= 1.0:
        return "1.0 (offload off)"
    if stand_in:
        return "none applies on the CPU (no device memory to fill)"
    return f"{p.trigger:.3g}"


def format_plan(
    p: Placement, model: ModelConfig, block_size: int, on_cpu: bool = False, stand_in: bool = False
) -> str:
    """The text `aioffload plan` prints: one row per run of layers in one place, then totals.
    `on_cpu`: the worker computes on the CPU; `stand_in`: the device total is the CPU's no-limit figure."""
    if p.experts is not None:
        from aioffload.offload.expert_plan_text import format_expert_plan

        return format_expert_plan(p, model, block_size)
    dtype_bytes = p.layer_bytes // layer_layout(model).numel
    vocab_bytes = model.vocab_size * model.hidden_size * dtype_bytes
    rows = [("embed_tokens", "host" if p.embed_on_host else "GPU", "", _size(vocab_bytes))]
    for place, layers in (("GPU", p.resident_layers), ("host", p.offloaded_layers)):
        if layers:
            rows.append((_span(layers), place, f"{_size(p.layer_bytes)} each", _size(len(layers) * p.layer_bytes)))
    rows.append(("final norm", "GPU", "", _size(model.hidden_size * dtype_bytes)))
    if model.tie_word_embeddings and not p.embed_on_host:
        rows.append(("lm_head", "GPU", "tied", "shares embed_tokens"))
    else:
        rows.append(("lm_head", "GPU", "tied copy" if model.tie_word_embeddings else "", _size(vocab_bytes)))
    lines = [f"  {a:<14} {b:<5} {c:<16} {d:>10}".rstrip() for a, b, c, d in rows]
    kv_tokens = p.kv_blocks * block_size
    if p.offload_active:
        floor = (
            f"{_duration(p.predicted_step_floor_s)} per decode step "
            f"({_gb(p.host_layer_bytes)} at {p.h2d_bytes_per_s / 1e9:.1f} GB/s host->GPU)"
        )
    else:
        floor = "no offload: step bound by " + ("the CPU's compute" if on_cpu else "HBM")
    lines += [
        f"GPU weights      {_gb(p.gpu_weight_bytes)} ({len(p.resident_layers)} of {model.num_layers} layers)",
        f"host weights     {_gb(p.host_weight_bytes)} ({'host memory' if on_cpu else 'pinned'}; "
        f"{len(p.offloaded_layers)} layers)",
        f"prefetch ring    {_gb(p.ring_bytes)} ({p.ring_slots} slots)",
        f"activations      {_gb(p.activation_bytes)} reserved",
        f"KV cache         {p.kv_blocks} blocks x {block_size} tokens = {kv_tokens} tokens "
        f"({_gb(p.kv_blocks * p.kv_block_bytes)})",
        f"device           {_gb(p.device_total_bytes)}{' stand-in (no limit on the CPU)' if stand_in else ''}",
        f"step floor       {floor}",
        f"trigger          {_trigger_text(p, stand_in)}",
        f"reason           {p.reason}",
    ]
    return "\n".join(lines)
