"""Split execution of an offloaded layer's MLP: the host computes chunks [0, k) from its pinned
buffer while the GPU computes chunks [k, C) from the streamed share; the partial outputs meet on
the GPU (DESIGN.md section 8, lever 1; the layout is offload/split_layout.py).

The host reads its share's down projection from a copy of its own: the down matrix's first
`max_chunks` chunks of columns, [H, K] (`host_down_columns`), so that `F.linear` takes it as a
K-contiguous weight. From the split layout's down^T rows ([K, H]) oneDNN read the share at ~29 GB/s
on the H200 host beside the weight stream, from the copy at ~53 (BENCHMARKS.md, sixth session).

Per offloaded layer, with the share k chosen for the step (offload/split_cost.py):

    GPU:   attention -> h -> (D2H h, record event) -> its MLP share ----------> wait host -> add
    host:                    wait event (blocking, no spin) -> host MLP share -> write partial
    copy:  streams the next layers' GPU shares the whole time (the transfer ring)

The host partial lands in mapped pinned memory that the add kernel reads directly: a
64 KB host-to-device copy queued behind the weight stream waited 16.6 ms on the H200
(BENCHMARKS.md), a zero-copy read 46 us. The GPU waits for the host on a word in that
memory (HostCompute); the host waits for the GPU on a blocking event; nothing spins.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from aioffload.model.layout import LayerWeights
from aioffload.model.llama import Mlp
from aioffload.offload.pinned import mapped_pinned, pinned_empty
from aioffload.offload.split_layout import SplitLayout, SplitWeights

log = logging.getLogger("aioffload.hybrid")


def silu_mul_chunks(gate_up: torch.Tensor, chunk: int, descending: bool = True) -> torch.Tensor:
    """[T, n x 2 x chunk] (gate|up per chunk, chunks ascending) -> [T, n x chunk], the chunks in
    descending order (the order of the down^T rows in the split layout) or ascending (the host's
    down columns)."""
    t = gate_up.shape[0]
    y = gate_up.view(t, -1, 2, chunk)  # [T, n, 2, ch]
    act = F.silu(y[:, :, 0]) * y[:, :, 1]  # silu rounds, then the mul (as HF)
    return (act.flip(1) if descending else act).reshape(t, -1)


def mlp_share(h: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, chunk: int,
              out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One side's MLP partial. h: [T, H]; gate_up: [n 2 ch, H]; down_t: [n ch, H] -> [T, H]."""
    act = silu_mul_chunks(F.linear(h, gate_up), chunk)  # [T, n ch]
    return torch.matmul(act, down_t, out=out)


def host_share(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, chunk: int,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The host's MLP partial. h: [T, H]; gate_up: [k 2 ch, H]; down: [H, k ch], the down matrix's
    columns of chunks [0, k) (a view of the host's copy, rows strided) -> [T, H]."""
    act = silu_mul_chunks(F.linear(h, gate_up), chunk, descending=False)  # [T, k ch]
    return torch.matmul(act, down.t(), out=out)  # = F.linear(act, down): no copy of the strided view


def host_down_columns(split: SplitLayout, flat: torch.Tensor, k: int) -> torch.Tensor:
    """[H, k ch]: the down matrix's columns of chunks [0, k), contiguous, from a split-layout buffer."""
    rows = split.down_t_rows(flat, 0, k).view(k, split.chunk, split.hidden)  # memory order: chunk k-1 first
    return rows.flip(0).reshape(k * split.chunk, split.hidden).t().contiguous()


def host_down_copies(host: dict[int, torch.Tensor], split: SplitLayout, k: int) -> dict[int, torch.Tensor]:
    """Per offloaded layer, the host's down columns of chunks [0, k) (plain memory: only the host reads them)."""
    t = time.perf_counter()
    copies = {layer: host_down_columns(split, flat, k) for layer, flat in host.items()} if k else {}
    n = sum(c.numel() * c.element_size() for c in copies.values())
    log.info("hybrid: the host's down columns of chunks [0, %d) of %d copied for %d layers: %.2f GB in %.1f s",
             k, split.num_chunks, len(copies), n / 1e9, time.perf_counter() - t)  # fmt: skip
    return copies


Ticket = tuple[int, Future[None]]  # (sequence number, job)

POLL_S = 2e-3  # poll an event this long before sleeping on it


def _wait_event(ev: torch.cuda.Event) -> None:
    """Wait for a layer input. The host thread polls the event briefly (it has nothing else to do
    then, and its OpenMP team is idle), yielding the GIL between polls, and sleeps on it (blocking
    sync) if the GPU is far behind. A blocking wait alone took ~72 us to wake on the H200: per
    offloaded layer, on the critical path."""
    deadline = time.perf_counter() + POLL_S
    while not ev.query():
        if time.perf_counter() > deadline:
            ev.synchronize()
            return
        time.sleep(0)


class HostCompute:
    """One dedicated host thread (its own OpenMP team of `threads`) computing host MLP shares.

    `start` queues a share and `finish` gives its partial as a device tensor usable in stream order.
    On CUDA nothing on the step thread waits: `start` copies the layer input into a pinned buffer
    and records an event; the host thread waits on that event (blocking sync: it sleeps), writes
    its partial into mapped pinned memory and then bumps a sequence word there; `finish` makes the
    compute stream wait for that word (cuStreamWaitValue32) before the add. So the step thread
    launches the whole step ahead, as on the streamed path, and no kernel launch sits between the
    host's result and the next layer (on the H200 those launches cost ~0.8 ms per layer when the
    step thread waited for the host instead). Two buffers of each kind alternate: job n+2 can only
    start once the GPU has consumed job n (stream order), which makes two enough.

    Without the driver call (or on the CPU device) `finish` waits for the job on the step thread.
    """

    def __init__(self, max_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, threads: int,
                 max_in_flight: int = 64, max_chunks: int | None = None) -> None:  # fmt: skip
        self.max_tokens, self.device, self.threads = max_tokens, device, threads
        self.max_chunks = max_chunks  # the most chunks of a share (the host's down copies hold that many); None: all
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aioffload-host", initializer=torch.set_num_threads,
                                       initargs=(threads,))  # fmt: skip
        self.trace: list[tuple[float, ...]] | None = None  # set to [] to record per-share timestamps
        self.observed: deque[tuple[int, int, float]] = deque(maxlen=4096)  # (tokens, chunks, host seconds)
        self.error: BaseException | None = None
        self._seq = 0
        n = max_tokens * hidden
        self.stream_wait: StreamWait | None = None
        if self.cuda:
            self.h_host = [pinned_empty(n, dtype).view(max_tokens, hidden) for _ in range(2)]  # [Tmax, H] each
            outs = [mapped_pinned(n, dtype, device) for _ in range(2)]
            self.out_host = [o[0].view(max_tokens, hidden) for o in outs]
            self.out_dev = [o[1].view(max_tokens, hidden) for o in outs]
            # A word in memory of its own: a small tensor could share a page with another registration.
            self.flag_host = mapped_pinned(1 << 16, torch.int32, device)[0][:1]
            self.flag_host.zero_()
            self.events = [torch.cuda.Event(blocking=True) for _ in range(max_in_flight + 2)]
            self.stream_wait = StreamWait.load()
        else:
            self.out_host = self.out_dev = [torch.empty(max_tokens, hidden, dtype=dtype) for _ in range(2)]

    @property
    def asynchronous(self) -> bool:
        return self.stream_wait is not None

    def start(self, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, chunk: int) -> Ticket:
        """Queue the host share for layer input h [T, H] (T <= max_tokens), weights as `host_share`
        takes them; returns a ticket for `finish`."""
        self._seq += 1
        seq, b, t = self._seq, self._seq % 2, h.shape[0]
        t0 = time.perf_counter() if self.trace is not None else 0.0
        if self.cuda:
            self.h_host[b][:t].copy_(h, non_blocking=True)
            ev = self.events[seq % len(self.events)]
            ev.record()
            fut = self.pool.submit(self._job, seq, self.h_host[b][:t], gate_up, down, chunk, ev, t0)
        else:
            fut = self.pool.submit(self._job, seq, h, gate_up, down, chunk, None, t0)
        return seq, fut

    def finish(self, ticket: Ticket, tokens: int) -> torch.Tensor:
        """The partial [T, H] of `ticket` as a device tensor, valid for work queued after this call."""
        seq, fut = ticket
        if self.stream_wait is not None:
            self.stream_wait(torch.cuda.current_stream(self.device).cuda_stream, self.flag_host.data_ptr(), seq)
        else:
            fut.result()
            self.check()
        return self.out_dev[seq % 2][:tokens]

    def _job(self, seq: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, chunk: int,
             ready: torch.cuda.Event | None, t_submit: float) -> None:  # fmt: skip
        t_start = time.perf_counter()
        try:
            if ready is not None:
                _wait_event(ready)
            t_ready = time.perf_counter()
            t = x.shape[0]
            host_share(x, gate_up, down, chunk, out=self.out_host[seq % 2][:t])
            t_done = time.perf_counter()
            self.observed.append((t, gate_up.shape[0] // (2 * chunk), t_done - t_ready))
            if self.trace is not None:
                self.trace.append((t_submit, t_start, t_ready, t_done))
        except BaseException as e:  # the GPU waits on the sequence word: it must be written anyway
            self.error = self.error or e
            log.exception("host share failed")
        finally:
            if self.cuda:
                self.flag_host.fill_(seq & 0x7FFFFFFF)

    def check(self) -> None:
        """Raise the first host-share failure (the worker calls this after each step)."""
        if self.error is not None:
            e, self.error = self.error, None
            raise RuntimeError("a host share of an offloaded layer failed") from e

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class StreamWait:
    """cuStreamWaitValue32 through the CUDA driver (ctypes): the stream waits until a 32-bit word,
    here in mapped host memory, is >= a value (wrap-around safe). No PyTorch API exposes it."""

    GEQ = 0x0

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    @classmethod
    def load(cls) -> StreamWait | None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        except (OSError, AttributeError) as e:
            log.warning("hybrid: cuStreamWaitValue32 unavailable (%s): the step thread waits for each host share", e)
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return cls(fn)

    def __call__(self, stream: int, addr: int, value: int) -> None:
        res = self.fn(ctypes.c_void_p(stream), ctypes.c_uint64(addr), ctypes.c_uint32(value & 0x7FFFFFFF), self.GEQ)
        if res != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUresult {res}")


class SplitMlp:
    """The decoder's Mlp for a model with split offloaded layers: a layer handed out as
    SplitWeights (by the transfer queue) is computed by both sides; any other layer by `dense`.
    `down`: per offloaded layer, the host's down columns (`host_down_copies`)."""

    def __init__(self, dense: Mlp, host: HostCompute, down: dict[int, torch.Tensor]) -> None:
        self.dense = dense
        self.host = host
        self.down = down

    def __call__(self, layer: int, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        if not isinstance(w, SplitWeights):
            return self.dense(layer, h, w)
        ch, k, c = w.split.chunk, w.k, w.split.num_chunks
        if k == 0:
            return mlp_share(h, w.gate_up, w.down_t, ch)
        down = self.down[layer]
        assert w.host_gate_up is not None and k * ch <= down.shape[1], f"host share {k} past its down copy"
        ticket = self.host.start(h, w.host_gate_up, down[:, : k * ch], ch)
        gpu = mlp_share(h, w.gate_up, w.down_t, ch) if k < c else None  # runs while the host computes
        host = self.host.finish(ticket, h.shape[0])
        return gpu.add_(host) if gpu is not None else host.clone()
