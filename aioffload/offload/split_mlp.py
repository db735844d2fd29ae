"""Split execution of an offloaded layer's MLP: the host computes chunks [0, k) from its pinned
buffer while the GPU computes chunks [k, C) from the streamed share; the partial outputs meet on
the GPU (DESIGN.md section 8, lever 1; the layout is offload/split_layout.py).

Per offloaded layer, with the share k chosen for the step (offload/split_cost.py):

    GPU:   attention -> h -> (D2H h, record event) -> its MLP share ----------> wait host -> add
    host:                    wait event (blocking, no spin) -> host MLP share -> write partial
    copy:  streams the next layers' GPU shares the whole time (the transfer ring)

The host partial lands in mapped pinned memory that the add kernel reads directly: a
64 KB host-to-device copy queued behind the weight stream waited 16.6 ms on the H200
(BENCHMARKS.md), a zero-copy read 46 us. The step thread waits for the host share on a
future (a sleeping wait); nothing ever spins on the GPU.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from aioffload.model.layout import LayerWeights
from aioffload.model.llama import Mlp
from aioffload.offload.pinned import mapped_pinned, pinned_empty
from aioffload.offload.split_layout import SplitWeights

log = logging.getLogger("aioffload.hybrid")


def silu_mul_chunks(gate_up: torch.Tensor, chunk: int) -> torch.Tensor:
    """[T, n x 2 x chunk] (gate|up per chunk, chunks ascending) -> [T, n x chunk] with the chunks
    in descending order, the order of the down^T rows in the split layout."""
    t = gate_up.shape[0]
    y = gate_up.view(t, -1, 2, chunk)  # [T, n, 2, ch]
    return (F.silu(y[:, :, 0]) * y[:, :, 1]).flip(1).reshape(t, -1)  # silu rounds, then the mul (as HF)


def mlp_share(h: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, chunk: int,
              out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One side's MLP partial. h: [T, H]; gate_up: [n 2 ch, H]; down_t: [n ch, H] -> [T, H]."""
    act = silu_mul_chunks(F.linear(h, gate_up), chunk)  # [T, n ch]
    return torch.matmul(act, down_t, out=out)


class HostCompute:
    """One dedicated host thread (its own OpenMP team of `threads`) computing host MLP shares.

    On CUDA the layer input is copied into a small pinned buffer and an event recorded; the
    thread waits on that event (blocking sync: it sleeps) and writes its partial into mapped
    pinned memory whose device view the GPU adds. On the CPU device the thread reads the input
    in place and writes a plain buffer: the same code, the "GPU" side being the step thread.
    """

    def __init__(self, max_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, threads: int) -> None:
        self.max_tokens, self.device, self.threads = max_tokens, device, threads
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aioffload-host", initializer=torch.set_num_threads,
                                       initargs=(threads,))  # fmt: skip
        self.trace: list[tuple[float, ...]] | None = None  # set to [] to record per-share timestamps
        n = max_tokens * hidden
        if self.cuda:
            self.h_host = pinned_empty(n, dtype).view(max_tokens, hidden)  # [Tmax, H]
            out_host, out_dev = mapped_pinned(n, dtype, device)
            self.out_host, self.out_dev = out_host.view(max_tokens, hidden), out_dev.view(max_tokens, hidden)
            self.ready = torch.cuda.Event(blocking=True)
        else:
            self.out_host = self.out_dev = torch.empty(max_tokens, hidden, dtype=dtype)

    def submit(self, h: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, chunk: int) -> Future[torch.Tensor]:
        """Start the host share for layer input h [T, H] (T <= max_tokens); the future gives the
        partial [T, H] as a device tensor. At most one share is in flight (the step waits for it
        before the next layer), which is what makes the single set of buffers safe."""
        t = h.shape[0]
        t0 = time.perf_counter() if self.trace is not None else 0.0
        if self.cuda:
            self.h_host[:t].copy_(h, non_blocking=True)
            self.ready.record()
            return self.pool.submit(self._run, self.h_host[:t], gate_up, down_t, chunk, True, t0)
        return self.pool.submit(self._run, h, gate_up, down_t, chunk, False, t0)

    def _run(self, x: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, chunk: int,
             wait: bool, t_submit: float) -> torch.Tensor:  # fmt: skip
        t_start = time.perf_counter() if self.trace is not None else 0.0
        if wait:
            self.ready.synchronize()
        t_ready = time.perf_counter() if self.trace is not None else 0.0
        t = x.shape[0]
        mlp_share(x, gate_up, down_t, chunk, out=self.out_host[:t])
        if self.trace is not None:
            self.trace.append((t_submit, t_start, t_ready, time.perf_counter()))
        return self.out_dev[:t]

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class SplitMlp:
    """The decoder's Mlp for a model with split offloaded layers: a layer handed out as
    SplitWeights (by the transfer queue) is computed by both sides; any other layer by `dense`."""

    def __init__(self, dense: Mlp, host: HostCompute) -> None:
        self.dense = dense
        self.host = host

    def __call__(self, layer: int, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        if not isinstance(w, SplitWeights):
            return self.dense(layer, h, w)
        ch, k, c = w.split.chunk, w.k, w.split.num_chunks
        if k == 0:
            return mlp_share(h, w.gate_up, w.down_t, ch)
        assert w.host_gate_up is not None and w.host_down_t is not None
        job = self.host.submit(h, w.host_gate_up, w.host_down_t, ch)
        gpu = mlp_share(h, w.gate_up, w.down_t, ch) if k < c else None  # runs while the host computes
        host = job.result()
        return gpu.add_(host) if gpu is not None else host.clone()
