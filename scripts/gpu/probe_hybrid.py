# ruff: noqa: B023, E741  (a probe script: closures run at once inside their loop)
"""GPU-machine probe for the host/GPU split of offloaded layers (issue 11), before building it.

Measures, on the lent H200 machine:
  1. host facts: CPU model, AMX/AVX-512 flags, oneDNN's chosen ISA for a bf16 matmul;
  2. pinned H2D bandwidth (436 MB) and host memory copy bandwidth;
  3. latency of a small (8 KB / 64 KB) H2D copy on a second stream while the weight stream
     copies 436 MB chunks, and of an 8 KB D2H on the compute stream meanwhile;
  4. zero-copy: a CUDA kernel reading mapped pinned memory (cudaHostRegisterMapped,
     wrapped with __cuda_array_interface__) while the weight stream copies;
  5. wake-up latency of a blocking CUDA event wait (no spinning);
  6. host bf16 MLP-share time (gate_up rows [k*256, H] then act @ downT [k*128, H], Llama-3-8B
     shapes) by thread count and batch, alone and while the weight stream copies.
Prints a table last; writes $OUT/probe_hybrid.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

OUT = os.environ.get("OUT", "/tmp/out")
H, I, CHUNK = 4096, 14336, 128
R: dict = {}


def rec(k: str, v: object) -> None:
    R[k] = v
    print(json.dumps({k: v}), flush=True)


def host_facts() -> None:
    info = open("/proc/cpuinfo").read()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    rec("cpu_model", model)
    rec("cpu_count", os.cpu_count())
    rec("cpu_flags", [f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx512_fp16"))])
    rec("mkldnn", torch.backends.mkldnn.is_available())
    code = (
        "import torch;import torch.nn.functional as F;"
        "x=torch.randn(1,4096,dtype=torch.bfloat16);w=torch.randn(1024,4096,dtype=torch.bfloat16);F.linear(x,w)"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    lines = [ln for ln in p.stdout.splitlines() if "isa" in ln.lower() or "exec" in ln][:6]
    rec("onednn_verbose", lines)


def h2d_and_host_bw(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = 436 * 2**20 // 2
    host = torch.empty(n, dtype=torch.bfloat16).pin_memory()
    g = torch.empty(n, dtype=torch.bfloat16, device=dev)
    g.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(8):
        g.copy_(host, non_blocking=True)
    e.record()
    e.synchronize()
    rec("h2d_GBps_436MB", round(8 * n * 2 / (s.elapsed_time(e) / 1e3) / 1e9, 2))
    a = torch.empty(1 << 30, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(4):
        b.copy_(a)
    rec("host_copy_GBps_rw", round(2 * 4 * a.numel() / (time.perf_counter() - t) / 1e9, 1))
    del a, b
    return host, g


class Streamer:
    """Keeps the weight stream busy with 436 MB H2D copies until stopped (polls, never spins)."""

    def __init__(self, host: torch.Tensor, dev_buf: torch.Tensor) -> None:
        self.host, self.dev_buf = host, dev_buf
        self.stream = torch.cuda.Stream()
        self.stop = threading.Event()
        self.copies = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with torch.cuda.stream(self.stream):
                for _ in range(2):
                    self.dev_buf.copy_(self.host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
            while not ev.query():
                time.sleep(0.0005)
            self.copies += 2

    def __enter__(self) -> Streamer:
        self.t0 = time.perf_counter()
        self.thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        self.thread.join()
        dt = time.perf_counter() - self.t0
        self.gbps = self.copies * self.host.numel() * 2 / dt / 1e9


def small_copy_latency(dev: torch.device, host: torch.Tensor, g: torch.Tensor) -> None:
    side = torch.cuda.Stream()
    res: dict = {}
    for nbytes in (8 << 10, 64 << 10):
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)

        def one(stream: torch.cuda.Stream, d2h: bool = False) -> float:
            done = torch.cuda.Event(blocking=True)
            t = time.perf_counter()
            with torch.cuda.stream(stream):
                if d2h:
                    src.copy_(dst, non_blocking=True)
                else:
                    dst.copy_(src, non_blocking=True)
                done.record(stream)
            done.synchronize()
            return (time.perf_counter() - t) * 1e6

        for _ in range(5):
            one(side)
        res[f"h2d_{nbytes >> 10}KB_idle_us"] = round(statistics.median(one(side) for _ in range(50)), 1)
        with Streamer(host, g) as st:
            lat = [one(side) for _ in range(50)]
            lat_d2h = [one(torch.cuda.current_stream(), d2h=True) for _ in range(50)]
        res[f"h2d_{nbytes >> 10}KB_busy_us_p50"] = round(statistics.median(lat), 1)
        res[f"h2d_{nbytes >> 10}KB_busy_us_max"] = round(max(lat), 1)
        res[f"d2h_{nbytes >> 10}KB_busy_us_p50"] = round(statistics.median(lat_d2h), 1)
        res["stream_GBps_during"] = round(st.gbps, 1)
    rec("small_copies", res)


def zero_copy(dev: torch.device, host: torch.Tensor, g: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    n = 4096
    hostbuf = torch.empty(n, dtype=torch.bfloat16)
    err = cudart.cudaHostRegister(hostbuf.data_ptr(), n * 2, 2)  # cudaHostRegisterMapped
    ok = int(getattr(err, "value", err)) == 0
    res: dict = {"register_ok": ok}
    if ok:
        devptr = hostbuf.data_ptr()  # UVA: a registered host pointer is also its device pointer

        class Wrap:
            __cuda_array_interface__ = {"shape": (n,), "typestr": "<i2", "data": (devptr, False), "version": 3}

        raw = torch.as_tensor(Wrap(), device=dev)
        mapped = raw.view(torch.bfloat16)
        hostbuf.copy_(torch.arange(n, dtype=torch.bfloat16))
        acc = torch.zeros(n, dtype=torch.bfloat16, device=dev)
        acc.add_(mapped)
        torch.cuda.synchronize()
        res["read_correct"] = bool(torch.equal(acc.cpu(), hostbuf))

        def lat() -> float:
            done = torch.cuda.Event(blocking=True)
            t = time.perf_counter()
            acc.add_(mapped)
            done.record()
            done.synchronize()
            return (time.perf_counter() - t) * 1e6

        for _ in range(5):
            lat()
        res["add_8KB_idle_us"] = round(statistics.median(lat() for _ in range(50)), 1)
        with Streamer(host, g):
            res["add_8KB_busy_us_p50"] = round(statistics.median(lat() for _ in range(50)), 1)
        # GPU writes into mapped memory (the D2H of h without a copy engine)
        src = torch.randn(n, device=dev).to(torch.bfloat16)
        mapped.copy_(src)
        torch.cuda.synchronize()
        res["write_correct"] = bool(torch.equal(hostbuf, src.cpu()))
    rec("zero_copy", res)


def blocking_event_wake() -> None:
    lat = []
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(30):
        e = torch.cuda.Event(blocking=True)
        y = x @ x
        e.record()
        t = time.perf_counter()
        e.synchronize()
        lat.append((time.perf_counter() - t) * 1e6)
        del y
    rec("blocking_event_wait_us_p50", round(statistics.median(lat), 1))


def host_mlp(host: torch.Tensor, g: torch.Tensor) -> None:
    k = 56  # half of 112 chunks
    gu = torch.randn(k * 2 * CHUNK, H, dtype=torch.bfloat16) * 0.01
    dt = torch.randn(k * CHUNK, H, dtype=torch.bfloat16) * 0.01
    mb = (gu.numel() + dt.numel()) * 2 / 1e6
    rec("host_share_MB", round(mb, 1))
    rows = []

    def share(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, gu).view(x.shape[0], k, 2, CHUNK)
        act = (F.silu(y[:, :, 0]) * y[:, :, 1]).flip(1).reshape(x.shape[0], -1)
        return act @ dt

    for threads in (12, 14, 15, 16):
        for batch in (1, 8, 32, 64):
            out: dict = {}

            def work() -> None:
                torch.set_num_threads(threads)
                x = torch.randn(batch, H, dtype=torch.bfloat16)
                for _ in range(3):
                    share(x)
                t = time.perf_counter()
                for _ in range(10):
                    share(x)
                out["alone"] = (time.perf_counter() - t) / 10 * 1e3
                with Streamer(host, g) as st:
                    t = time.perf_counter()
                    for _ in range(10):
                        share(x)
                    out["busy"] = (time.perf_counter() - t) / 10 * 1e3
                out["gbps"] = st.gbps

            th = threading.Thread(target=work)  # a dedicated thread with its own OpenMP team
            th.start()
            th.join()
            rows.append({"threads": threads, "batch": batch, "ms_alone": round(out["alone"], 2),
                         "ms_with_copies": round(out["busy"], 2), "GBps_host": round(mb / out["busy"], 1),
                         "copy_GBps_during": round(out["gbps"], 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    rec("host_mlp_share", rows)


def main() -> None:
    dev = torch.device("cuda")
    host_facts()
    host, g = h2d_and_host_bw(dev)
    small_copy_latency(dev, host, g)
    try:
        zero_copy(dev, host, g)
    except Exception as e:  # record and go on
        rec("zero_copy", {"error": f"{type(e).__name__}: {e}"})
    blocking_event_wake()
    host_mlp(host, g)
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/probe_hybrid.json", "w") as f:
        json.dump(R, f, indent=1)
    print("\n== summary")
    for k in ("cpu_model", "h2d_GBps_436MB", "host_copy_GBps_rw", "small_copies", "zero_copy",
              "blocking_event_wait_us_p50"):  # fmt: skip
        print(f"{k}: {R.get(k)}")
    for r in R["host_mlp_share"]:
        print(r)


if __name__ == "__main__":
    main()
