"""Offload-aware batching arithmetic (DESIGN.md section 5): how many tokens a streamed step carries for free."""

from __future__ import annotations


def offload_token_budget(base: int, floor_s: float, num_params: int, gpu_flops: float, cap: int = 16384) -> int:
    """Token budget while offload is active (DESIGN.md section 5).

    Every step costs at least the copy floor `floor_s`, and a token costs ~2 FLOPs per
    weight; tokens the GPU computes within the floor are free. `gpu_flops` is the dense
    rate we count on (0 on the CPU: no raise). Never below `base`, never above `cap`.
    """
    free_tokens = int(floor_s * gpu_flops / (2 * max(1, num_params)))
    return max(base, min(free_tokens, cap))
