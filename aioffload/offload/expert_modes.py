"""Per layer, per step: stream only the routed experts, or the layer's whole expert set?

Routed streaming copies only what the router picked, but only once the router has run:
the copy engine idles while the host reads the routed indices and issues the copies
(`ROUTED_BUBBLE_S` per layer). Whole-set streaming copies every offloaded expert, but
ahead of time, overlapped with earlier layers, as the dense ring does. At batch 1 top-8
of 128 routes 8 experts: routed wins 16x. At batch 64 the union is ~126 of 128: whole
wins. The decision is made at the start of each step from the step's token count, the
predicted union and the measured host-to-device bandwidth (`choose_full`); at 54 GB/s for
Qwen3-30B-A3B's 9.4 MB experts the switch falls between 32 and 64 tokens per step.
"""

from __future__ import annotations

import math

# Copy-engine idle time per routed layer: the router's top-k reaching the host (an event), the
# host issuing the copies, then the expert GEMMs and the next layer's attention before the
# next copies start. An estimate for an H100/H200 at small batch; `aioffload bench offload`
# on an MoE model reports the measured step against the routed-bytes floor.
ROUTED_BUBBLE_S = 150e-6


class UnionModel:
    """Expected number of distinct experts that `t` tokens x top-k choices reach in a layer:
    E (1 - (1 - k/E)^(s t)), the uniform-router figure with an effective token count s t.
    s is fitted per layer to the unions observed (EMA); s < 1 when the router is skewed or
    tokens agree, s = 1 for a uniform router. Batch-1 steps carry no information (the union
    is always k) and leave s as it is."""

    def __init__(self, num_experts: int, top_k: int, alpha: float = 0.3) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.alpha = alpha
        self.scale: dict[int, float] = {}

    def predict(self, layer: int, tokens: int) -> float:
        e, k = self.num_experts, self.top_k
        if k >= e:
            return float(e)
        s = self.scale.get(layer, 1.0)
        return e * (1.0 - (1.0 - k / e) ** (s * tokens))

    def observe(self, layer: int, tokens: int, union: int) -> None:
        e, k = self.num_experts, self.top_k
        if tokens <= 1 or k >= e:
            return
        frac = min(union, e - 0.5) / e  # a full union says "at least this skew-free": cap it
        s = math.log(1.0 - frac) / (tokens * math.log(1.0 - k / e))
        s = min(4.0, max(0.02, s))
        old = self.scale.get(layer)
        self.scale[layer] = s if old is None else (1 - self.alpha) * old + self.alpha * s


def choose_full(
    predicted_union: float, num_experts: int, offloaded: int, cached: int, bubble_experts: float, h2d_per_hbm: float
) -> bool:
    """True: stream the layer's whole expert set ahead of time; False: the routed union after the router.
    Costs in expert copies' worth of copy-engine time: whole set = offloaded - cached (never idle);
    routed = the union's offloaded, uncached share + the idle gap: the fixed bubble
    (ROUTED_BUBBLE_S x H2D bandwidth / expert bytes) and the expert GEMMs, which read the union's
    weights from device memory before the next layer's copies can start (union x H2D / HBM)."""
    if offloaded == 0:
        return False
    uncached = 1.0 - cached / offloaded
    routed = predicted_union * (offloaded / num_experts * uncached + h2d_per_hbm) + bubble_experts
    return offloaded - cached <= routed
