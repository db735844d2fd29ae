"""worker/gemv_choice.py: the matrices handed over per kind, and (on a GPU) the timed choice that
routes exactly the shapes where the GEMV wins."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="worker/gemv_choice.py imports model/gemv.py (triton)")


def test_layer_matrices_collects_each_kind_in_layer_order() -> None:
    from aioffload.worker.gemv_choice import layer_matrices

    a, b = torch.zeros(6, 4), torch.ones(6, 4)
    dense = [types.SimpleNamespace(qkv_w=a, o_w=a, gate_up_w=a, down_w=a),
             types.SimpleNamespace(qkv_w=b, o_w=b, gate_up_w=b, down_w=b)]  # fmt: skip
    got = layer_matrices(dense)
    assert list(got) == ["qkv", "o", "gate_up", "down"] and all(len(v) == 2 and v[1] is b for v in got.values())
    moe = layer_matrices([types.SimpleNamespace(qkv_w=a, o_w=b)])  # experts, no dense MLP matrices
    assert moe["gate_up"] == [] and moe["down"] == [] and moe["o"] == [b]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_choose_gemv_shapes_times_both_and_routes_only_winners() -> None:
    from aioffload.model import gemv
    from aioffload.worker.gemv_choice import MIN_GAIN, choose_gemv_shapes

    dev = torch.device("cuda")

    def mats(n: int) -> list[torch.Tensor]:
        return [(torch.randn(n, 4096, device=dev) / 64).to(torch.bfloat16) for _ in range(4)]

    ws = {"o": mats(4096), "qkv": mats(6144), "down": []}
    saved = gemv.SHAPES
    try:
        times = choose_gemv_shapes(ws)
        assert set(times) == {"o", "qkv"} and all(c > 0 and g > 0 for c, g, _ in times.values())
        assert all(routed == (g < c * (1 - MIN_GAIN)) for c, g, routed in times.values())
        assert gemv.SHAPES == {(ws[k][0].shape[0], 4096) for k, (_, _, routed) in times.items() if routed}
        x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
        assert (gemv.linear(x, ws["o"][0]).float() - F.linear(x, ws["o"][0]).float()).abs().max().item() < 4e-2
    finally:
        gemv.route(saved)
