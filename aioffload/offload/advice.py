"""What to change when a placement cannot work: each suggested flag is checked against the same
arithmetic (a plan built with it is valid), never guessed."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from aioffload.config import CacheConfig, ConfigError, OffloadConfig
from aioffload.offload.units import gb as _gb
from aioffload.offload.units import round_up_2

if TYPE_CHECKING:
    from aioffload.offload.placement import Placement, _Budget

TRIGGER_STEPS = 20  # suggested triggers are multiples of 1/20 = 0.05


def fixed_pool_too_small(cache: CacheConfig, blocks: int, max_model_len: int, block_bytes: int) -> ConfigError:
    need = -(-max_model_len // cache.block_size)
    if cache.num_blocks is not None:
        return ConfigError(
            f"--num-kv-blocks {blocks} holds {blocks * cache.block_size} tokens, fewer than one --max-model-len "
            f"{max_model_len} sequence: give --num-kv-blocks {need} or more, or --max-model-len "
            f"{blocks * cache.block_size} or less"
        )
    gb = math.ceil(need * block_bytes / 1e6) / 1e3  # GB, rounded up to the MB
    return ConfigError(
        f"--cpu-kv-cache-gb {cache.cpu_kv_cache_gb:g} holds {blocks * cache.block_size} tokens, fewer than one "
        f"--max-model-len {max_model_len} sequence ({_gb(need * block_bytes)}): give --cpu-kv-cache-gb {gb:g} or "
        f"more, or --max-model-len {blocks * cache.block_size} or less"
    )


def _valid(b: _Budget, resident: int, max_model_len: int) -> bool:
    return b.build(resident).kv_tokens >= max_model_len


def _suggest_trigger(b: _Budget, max_model_len: int) -> float | None:
    """The largest multiple of 0.05 (<= gpu_memory_utilization) whose plan is valid."""
    for k in range(TRIGGER_STEPS - 1, -1, -1):
        t = k / TRIGGER_STEPS
        if t <= b.utilization and _valid(b, b.resident_for_trigger(t), max_model_len):
            return t
    return None


def _suggest_host_gb(b: _Budget, max_model_len: int) -> float | None:
    """The shortest decimal N whose --cpu-offload-gb tail is the smallest valid one."""
    lb = b.layer_bytes
    for n in range(1, b.num_layers + 1):
        if _valid(b, b.num_layers - n, max_model_len):
            for digits in range(1, 10):  # shortest x with (n-1) x lb < x x 1e9 <= n x lb
                q = n * lb // 10 ** (9 - digits)
                if q * 10 ** (9 - digits) > (n - 1) * lb:
                    return q / 10**digits
    return None


def no_room(b: _Budget, p: Placement, offload: OffloadConfig, max_model_len: int) -> ConfigError:
    t, host_gb = _suggest_trigger(b, max_model_len), _suggest_host_gb(b, max_model_len)
    fixes = ([f"--trigger {t:g}"] if t is not None else []) + (
        [f"--cpu-offload-gb {host_gb:g}"] if host_gb is not None else []
    )
    if p.kv_tokens > 0:
        fixes.append(f"--max-model-len {p.kv_tokens}")
    one_seq = -(-max_model_len // b.block_size) * b.kv_block_bytes
    if not p.offload_active and offload.trigger == 1.0:
        msg = (
            f"weights need {_gb(p.gpu_weight_bytes)} but a {_gb(b.total)} card at --gpu-memory-utilization "
            f"{b.utilization:g} leaves {_gb(b.usable)} for weights, {_gb(b.activation_bytes)} of activations "
            f"and the KV cache of one {max_model_len}-token sequence ({_gb(one_seq)})"
        )
    else:
        left = b.usable - p.gpu_weight_bytes - p.ring_bytes - p.activation_bytes
        msg = (
            f"the KV cache gets {_gb(max(0.0, left))} after {_gb(p.gpu_weight_bytes)} of weights, "
            f"{_gb(p.ring_bytes)} of prefetch ring and {_gb(p.activation_bytes)} of activations: "
            f"{p.kv_tokens} tokens, fewer than --max-model-len {max_model_len} ({_gb(one_seq)})"
        )
    if t is None and host_gb is None:
        return ConfigError(f"{msg}; {_all_on_host_fixes(b, p, max_model_len, one_seq)}")
    return ConfigError(f"{msg}; try {' or '.join(fixes)}")


def _all_on_host_fixes(b: _Budget, p: Placement, max_model_len: int, one_seq: int) -> str:
    """When no split works: what memory must hold with every layer on the host, and each change
    that makes that plan valid (each one checked, not guessed)."""
    base = b.gpu_weights(0) + b.ring(0)
    need = base + b.activation_bytes + one_seq
    reserve = f"the {_gb(b.activation_bytes)} activation reserve"
    if b.reserve_per_token:
        fixed = b.activation_bytes - b.reserve_per_token * b.reserve_tokens
        reserve += f" ({_gb(fixed)} of it workspace and logits, the rest for {b.reserve_tokens} batched tokens)"
    head = (
        f"even with every decoder layer on the host, {_gb(b.usable)} ({b.utilization:g} x {_gb(b.total)}) must "
        f"hold {_gb(base)} of weights and prefetch ring, {reserve} and {_gb(one_seq)} of KV for one "
        f"{max_model_len}-token sequence ({_gb(need)})"
    )
    fixes = []
    most = b.build(0).kv_tokens
    if most > 0:
        fixes.append(f"lower --max-model-len (this plan holds {p.kv_tokens} tokens, {most} with every layer on the "
                     f"host: --trigger 0 --max-model-len {most})")  # fmt: skip
    util = math.ceil(need / b.total * 100) / 100
    if util <= 1.0 and dataclasses.replace(b, utilization=util).build(0).kv_tokens >= max_model_len:
        fixes.append(f"--trigger 0 --gpu-memory-utilization {util:g}")
    if b.reserve_per_token:  # the reserve is the estimate: fewer batched tokens shrink it
        fixed = b.activation_bytes - b.reserve_per_token * b.reserve_tokens
        tokens = math.floor((b.usable - base - one_seq - fixed) / b.reserve_per_token)
        tokens = tokens // 16 * 16 if tokens >= 16 else tokens
        smaller = dataclasses.replace(b, activation_bytes=fixed + tokens * b.reserve_per_token)
        if 1 <= tokens < b.reserve_tokens and smaller.build(0).kv_tokens >= max_model_len:
            fixes.append(f"--trigger 0 --max-num-batched-tokens {tokens}")
    card = round_up_2(need / b.utilization / 1e9)
    fixes.append(f"a card of at least {card:g} GB (--trigger 0 --gpu-memory-gb {card:g} plans for one)")
    return f"{head}: {' or '.join(fixes)}"
