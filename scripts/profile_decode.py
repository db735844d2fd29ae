"""Where does a resident batch-1 decode step go? (GPU only; run on the device machine.)

Times, on the synthetic Llama-3-8B checkpoint: the full Worker.execute step, the graph
replay alone, a bare matmul chain (the same weights, matmuls only) in a CUDA graph, and
an eager step under torch.profiler (kernel count and time per kernel name).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from aioffload.bench.synthetic import make_synthetic_checkpoint
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker


def cuda_ms(fn, n: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main() -> None:
    path = make_synthetic_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "/tmp/synth8b/llama3-8b", "llama3-8b")
    cfg = EngineConfig(model=str(path), cache=CacheConfig(num_blocks=2048),
                       scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=1024)).validate()  # fmt: skip
    w = Worker(cfg, Checkpoint.open(path))
    table = {}
    chunk = SeqChunk([5] * 128, 0, list(range(8)))
    w.execute([chunk], [SamplingParams(temperature=0)], [0], [0])
    dec = SeqChunk([7], 128, list(range(9)))
    p = [SamplingParams(temperature=0)]
    table["execute_ms"] = cuda_ms(lambda: w.execute([dec], p, [0], [1]))
    inp = build_inputs([dec], 16, w.device)
    table["build_inputs_ms"] = cuda_ms(lambda: build_inputs([dec], 16, w.device))
    assert w.graphs is not None
    table["graph_run_ms"] = cuda_ms(lambda: w.graphs.run([dec]))
    table["graph_replay_ms"] = cuda_ms(lambda: w.graphs.graphs[1].replay())
    table["eager_forward_ms"] = cuda_ms(
        lambda: w.model.forward(inp.input_ids, inp.positions, inp.meta, w.kv), n=10
    )
    # Bare matmuls with the same weights, in a graph: the achievable floor for GEMV.
    layers = [w.layers.acquire(i) for i in range(32)]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        h = x
        for lw in layers:
            qkv = F.linear(h, lw.qkv_w)
            h = h + F.linear(qkv[:, :4096], lw.o_w)
            g, u = F.linear(h, lw.gate_up_w).chunk(2, -1)
            h = h + F.linear(g * u, lw.down_w)
        return F.linear(h, w.model.lm_head)

    chain()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    table["matmul_chain_graph_ms"] = cuda_ms(g.replay)
    wbytes = sum(lw.flat.numel() * 2 for lw in layers) + w.model.lm_head.numel() * 2
    table["matmul_chain_GBps"] = wbytes / (table["matmul_chain_graph_ms"] / 1e3) / 1e9
    # Kernel census of one eager forward.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        w.model.forward(inp.input_ids, inp.positions, inp.meta, w.kv)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        if evt.device_type.name == "CUDA" or getattr(evt, "self_device_time_total", 0):
            rows.append((evt.key[:70], evt.count, getattr(evt, "self_device_time_total", 0) / 1e3))
    rows.sort(key=lambda r: -r[2])
    table["kernels_per_step"] = sum(r[1] for r in rows)
    print(f"{'kernel':72s} {'count':>6s} {'ms':>8s}")
    for name, count, ms in rows[:25]:
        print(f"{name:72s} {count:6d} {ms:8.3f}")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "profile_decode.json"), "w") as f:
        json.dump({"table": table, "kernels": rows[:60]}, f, indent=1)
    for k, v in table.items():
        print(f"{k:28s} {v:10.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    time.sleep(0)


if __name__ == "__main__":
    main()
