"""No garbage collection while a CUDA graph is captured.

A collection that runs mid-capture and frees an earlier worker's CUDA objects (pinned buffers,
graphs, events: a test builds many workers, and a spy or a closure can keep one in a cycle)
makes an illegal call on a capturing stream, which invalidates the capture ("operation failed
due to a previous error during capture") and leaves the RNG state broken for the process.
torch.cuda.graph collects once before a capture; this keeps the collector off until it ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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
