"""Which weight shapes one-row steps send to model/gemv.py's Triton GEMV, measured at start-up.

For each kind of matrix (qkv, o, gate_up, down) the worker hands over every resident layer's
matrix: distinct memory, as a decode step reads them, so no timing is an L2 hit. One row goes
through all of them in one CUDA graph with cuBLAS and in another with the GEMV; a shape takes the
GEMV when it is at least MIN_GAIN faster (on an H200 at Llama-3-8B: the o projection only,
BENCHMARKS.md, fourth session, call 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from aioffload.model import gemv
from aioffload.model.layout import LayerWeights
from aioffload.worker.capture import capture_graphs

MIN_GAIN = 0.03
KINDS = ("qkv", "o", "gate_up", "down")
PATHS = {"cublas": F.linear, "gemv": gemv.gemv}


def layer_matrices(layers: Sequence[LayerWeights]) -> dict[str, list[torch.Tensor]]:
    """Per kind, the layers' matrices of that kind (a kind the layers lack, e.g. MoE's MLP, is empty)."""
    return {k: [getattr(w, f"{k}_w") for w in layers if getattr(w, f"{k}_w", None) is not None] for k in KINDS}


def _replay_us(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    """Microseconds per call of a graph of `calls` matmuls: the median of 5 replays."""
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[2]


def choose_gemv_shapes(matrices: dict[str, Sequence[torch.Tensor]]) -> dict[str, tuple[float, float, bool]]:
    """Time each kind both ways, route the winning shapes (gemv.route), and return per kind
    (cuBLAS us, GEMV us, routed to the GEMV) per matrix."""
    out: dict[str, tuple[float, float, bool]] = {}
    for kind, ws in matrices.items():
        if not ws:
            continue
        x = torch.randn(1, ws[0].shape[1], dtype=ws[0].dtype, device=ws[0].device)

        def every_matrix(path: str, x: torch.Tensor = x, ws: Sequence[torch.Tensor] = ws) -> torch.Tensor:
            return [PATHS[path](x, w) for w in ws][-1]

        graphs, _ = capture_graphs(PATHS, every_matrix)
        cublas, ours = (_replay_us(graphs[p], len(ws)) for p in PATHS)
        out[kind] = (round(cublas, 2), round(ours, 2), ours < cublas * (1 - MIN_GAIN))
    gemv.route((ws[0].shape[0], ws[0].shape[1]) for kind, ws in matrices.items() if kind in out and out[kind][2])
    return out
