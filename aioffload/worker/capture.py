"""Capturing CUDA graphs: `capture_graphs` (the loop every graph runner shares) and `no_gc`.

No garbage collection while a CUDA graph is captured.
A collection that runs mid-capture and frees an earlier worker's CUDA objects (pinned buffers,
graphs, events: a test builds many workers, and a spy or a closure can keep one in a cycle)
makes an illegal call on a capturing stream, which invalidates the capture ("operation failed
due to a previous error during capture") and leaves the RNG state broken for the process.
torch.cuda.graph collects once before a capture; this keeps the collector off until it ends.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)


@contextmanager
def no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture_graphs(
    keys: Iterable[K], forward: Callable[[K], torch.Tensor]
) -> tuple[dict[K, torch.cuda.CUDAGraph], dict[K, torch.Tensor]]:
    """One CUDA graph per key of `forward(key)`, in the order given (largest first, so later graphs
    reuse its memory: they share one pool), each run once on a side stream before its capture
    (Triton compiles, cuBLAS handles); garbage collection off throughout. Returns the graphs and
    the output tensors their replays write."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    graphs: dict[K, torch.cuda.CUDAGraph] = {}
    outputs: dict[K, torch.Tensor] = {}
    with no_gc():
        for key in keys:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(key)  # the warm-up
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs[key] = forward(key)
            graphs[key] = graph
        torch.cuda.synchronize()
    return graphs, outputs
