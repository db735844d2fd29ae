"""Attention kernels alone, Llama-3-8B heads (32 query, 8 KV, head dim 128, bf16), on the GPU:
our paged prefill kernel (a few launch configurations) against PyTorch's native paths (SDPA
as transformers calls it, `varlen_attn`, FlexAttention with a causal block mask) on one
fresh prompt, our kernel on a chunk after a cached prefix, and split-KV decode at batch 1.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aioffload.bench.common import phase, say
from aioffload.worker.inputs import SeqChunk, build_inputs

HQ, HKV, D, BLOCK = 32, 8, 128, 16
CHUNK = 2048  # the prefix-chunk case: the last CHUNK tokens after a cached prefix
# (query tile, key tile, warps, pipeline stages): the default (prefill_kernel.launch_config) first
CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]


def time_cuda(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of fn() on the current stream, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def causal_flops(queries: int, keys: int) -> float:
    """QK^T and PV FLOPs when `queries` rows end a `keys`-long causal context (all heads)."""
    pairs = queries * (keys - queries) + queries * (queries + 1) / 2
    return 4 * HQ * D * pairs


class PagedCase:
    """One sequence of `length` tokens, its K/V in a shuffled paged cache; queries = the last `queries`."""

    def __init__(self, length: int, queries: int, dev: torch.device, seed: int = 0) -> None:
        g = torch.Generator(dev).manual_seed(seed)
        nb = -(-length // BLOCK)
        table = torch.randperm(nb, device=dev, generator=g)
        self.k = torch.randn(length, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)  # [L, Hkv, D]
        self.v = torch.randn(length, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
        self.q = torch.randn(length, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)  # [L, Hq, D]
        self.k_cache = torch.zeros(nb + 1, BLOCK, HKV, D, device=dev, dtype=torch.bfloat16)
        self.v_cache = torch.zeros_like(self.k_cache)
        pos = torch.arange(length, device=dev)
        slots = table[pos // BLOCK] * BLOCK + pos % BLOCK
        self.k_cache.view(-1, HKV, D)[slots] = self.k
        self.v_cache.view(-1, HKV, D)[slots] = self.v
        start = length - queries
        self.meta = build_inputs([SeqChunk([0] * queries, start, table.tolist())], BLOCK, dev).meta
        self.rows = self.q[start:]
        self.queries, self.length = queries, length


def _ours(case: PagedCase, tile: int, block_n: int, warps: int, stages: int) -> Callable[[], torch.Tensor]:
    from aioffload.attention import prefill_kernel
    from aioffload.attention.tiles import plan_rows

    tiles_list, _ = plan_rows([case.queries], [case.length - case.queries], tile)
    tiles = torch.tensor(tiles_list, dtype=torch.int32, device=case.q.device)
    out = torch.empty_like(case.rows)
    return lambda: prefill_kernel.prefill_attention(case.rows, case.k_cache, case.v_cache, case.meta.block_tables,
                                                    tiles, D**-0.5, out, tile, block_n, warps, stages)  # fmt: skip


def _sdpa(case: PagedCase) -> Callable[[], torch.Tensor]:
    """What transformers' sdpa attention runs for one unpadded prompt: [1, H, L, D], is_causal, GQA."""
    q, k, v = (x.transpose(0, 1)[None] for x in (case.q, case.k, case.v))
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _varlen(case: PagedCase) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    k, v, kw = case.k, case.v, {}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    else:  # an older signature: expand K/V over the group
        k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (case.k, case.v))
    kw.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    n = case.length
    cu = torch.tensor([0, n], dtype=torch.int32, device=case.q.device)
    return lambda: varlen_attn(case.q, k, v, cu, cu, n, n, **kw)


def _flex(case: PagedCase) -> tuple[Callable[[], torch.Tensor], float]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = case.length
    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, 1, 1, n, n, device=case.q.device)
    fa = torch.compile(flex_attention, dynamic=False)
    q, k, v = (x.transpose(0, 1)[None] for x in (case.q, case.k, case.v))
    t = time.perf_counter()
    fa(q, k, v, block_mask=mask, enable_gqa=True)
    torch.cuda.synchronize()
    return (lambda: fa(q, k, v, block_mask=mask, enable_gqa=True)), time.perf_counter() - t


def _entry(name: str, seconds: float, flops: float, err: float | None = None) -> dict:
    e = {"path": name, "ms": round(seconds * 1e3, 3), "tflops": round(flops / seconds / 1e12, 1)}
    if err is not None:
        e["max_err_vs_sdpa"] = round(err, 4)
    return e


def run_kernels(dev: torch.device, lengths: list[int], flex_length: int | None, R: dict) -> None:
    """R["kernels"]: per prompt length, each path's ms and TFLOP/s; R["split_kv"]: decode at batch 1."""
    from aioffload.attention import paged_kernel
    from aioffload.attention.backends import TritonPagedBackend

    R["kernels"] = []
    for n in lengths:
        with phase(R, f"kernels_{n}"):
            reps = 5 if n <= 8192 else 3
            case, flops = PagedCase(n, n, dev), causal_flops(n, n)
            ref = _sdpa(case)()  # [1, Hq, L, D]: transformers' path, the reference
            row: dict = {"length": n, "paths": []}
            for tile, block_n, warps, stages in CONFIGS:
                fn = _ours(case, tile, block_n, warps, stages)
                err = (fn().transpose(0, 1)[None].float() - ref.float()).abs().max().item()
                name = f"ours m{tile} n{block_n} w{warps} s{stages}"
                row["paths"].append(_entry(name, time_cuda(fn, reps), flops, err))
            row["paths"].append(_entry("sdpa (transformers)", time_cuda(_sdpa(case), reps), flops))
            del ref
            with phase(R, f"varlen_{n}"):
                row["paths"].append(_entry("varlen_attn", time_cuda(_varlen(case), reps), flops))
            if n == flex_length:
                with phase(R, f"flex_{n}"):
                    fn, compile_s = _flex(case)
                    row["paths"].append({**_entry("flex_attention", time_cuda(fn, reps), flops),
                                         "compile_s": round(compile_s, 1)})  # fmt: skip
            if n > CHUNK:  # what chunked prefill runs: the last CHUNK queries after a cached prefix
                chunk = PagedCase(n, CHUNK, dev, seed=1)
                s = time_cuda(_ours(chunk, *CONFIGS[0]), reps)
                row["paths"].append(_entry(f"ours last {CHUNK} after {n - CHUNK}", s, causal_flops(CHUNK, n)))
            R["kernels"].append(row)
            best = max(row["paths"], key=lambda e: e["tflops"])
            say(f"attention {n}: " + "; ".join(f"{e['path']} {e['ms']} ms ({e['tflops']} TFLOP/s)"
                                               for e in row["paths"]) + f" -> fastest: {best['path']}")  # fmt: skip
    with phase(R, "split_kv"):
        R["split_kv"] = []
        backend = TritonPagedBackend()
        for ctx in (1000, 8000, 32000):
            case = PagedCase(ctx, 1, dev, seed=2)
            kv_bytes = 2 * ctx * HKV * D * 2
            m = case.meta
            for splits in sorted({1, backend._splits(1, HKV, dev)}):
                args = (case.rows, case.k_cache, case.v_cache, m.block_tables, m.row_seq, m.row_ctx, D**-0.5)
                s = time_cuda(lambda a=args, sp=splits: paged_kernel.paged_attention(*a, splits=sp), 20)
                R["split_kv"].append({"context": ctx, "splits": splits, "us": round(s * 1e6, 1),
                                      "GBps": round(kv_bytes / s / 1e9, 1)})  # fmt: skip
                say(f"decode attention, batch 1, context {ctx}, {splits} splits: {s * 1e6:.1f} us "
                    f"({kv_bytes / s / 1e9:.0f} GB/s of K/V)")  # fmt: skip
