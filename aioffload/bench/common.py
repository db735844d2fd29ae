"""Shared benchmark helpers: stats, output (JSON, table), bandwidths, and a step driver
that runs `Worker.execute` directly with engine-shaped chunks (prefill, then decode)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from aioffload.attention.kv_cache import BlockManager, BlockPool
from aioffload.config import EngineConfig
from aioffload.engine.prefill_share import chunk_tokens
from aioffload.offload.device import measure_h2d_bytes_per_s
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker

GREEDY = SamplingParams(max_tokens=1 << 30, temperature=0.0)


# ---- arguments and setup ------------------------------------------------------------------


def add_synthetic_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from aioffload.bench.synthetic import SHAPES

    p.add_argument("--synthetic", choices=(*SHAPES, "none"), default=default,
                   help="create (or reuse) a random-weight checkpoint of this shape under --synthetic-dir and use "
                        f"it as --model (default: {default or 'none'})")  # fmt: skip
    p.add_argument("--synthetic-dir", default="/tmp/aioffload-synth", help="where synthetic checkpoints live")
    p.add_argument("--synthetic-layers", type=int, default=None,
                   help="write only this many decoder layers of the shape (default: all; 12 for qwen3-30b-a3b)")


def int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {value!r}")
    return out


def resolve_model(config: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """Point the config at a synthetic checkpoint when --synthetic asks for one."""
    shape = getattr(args, "synthetic", None)
    if not shape or shape == "none":
        return config
    from aioffload.bench.synthetic import BENCH_LAYERS, make_synthetic_checkpoint

    layers = getattr(args, "synthetic_layers", None) or BENCH_LAYERS.get(shape)
    name = shape if layers is None else f"{shape}-{layers}l"
    path = make_synthetic_checkpoint(Path(args.synthetic_dir) / name, shape, num_layers=layers)
    return config.replace(model=str(path))


def with_scheduler(config: EngineConfig, **changes: Any) -> EngineConfig:
    return config.replace(scheduler=dataclasses.replace(config.scheduler, **changes))


def with_offload(config: EngineConfig, **changes: Any) -> EngineConfig:
    return config.replace(offload=dataclasses.replace(config.offload, **changes))


def build_worker(config: EngineConfig) -> Worker:
    from aioffload.checkpoint.checkpoint import Checkpoint

    t = time.perf_counter()
    worker = Worker(config, Checkpoint.open(config.model))
    p = worker.placement
    say(
        f"worker ready in {time.perf_counter() - t:.1f} s: {len(p.resident_layers)} layers resident, "
        f"{len(p.offloaded_layers)} offloaded, CUDA graphs {'on' if worker.graphs else 'off'}, "
        f"{worker.num_blocks} KV blocks ({p.reason})"
    )
    return worker


def free_device_memory() -> None:
    """Call after dropping every reference to a worker/engine/model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # return cached pinned host blocks too


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM, the kernel's high-water mark) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: 5 to clear_refs), so the next worker's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} {p.total_memory / 2**30:.1f} GiB"
    return f"cpu ({os.cpu_count()} cores)"


def say(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def phase(result: dict, name: str) -> Iterator[None]:
    """Run a benchmark phase; an exception is recorded in result["errors"][name] and swallowed,
    so one failure does not lose the other figures. Its duration goes to result["phase_s"]."""
    say(f"== {name}")
    t = time.perf_counter()
    try:
        yield
    except Exception as e:
        result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        say(f"{name} failed: {type(e).__name__}: {e} (recorded; going on)")
    finally:
        result.setdefault("phase_s", {})[name] = round(time.perf_counter() - t, 1)


# ---- stats and output ---------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    """avg, p10, p50, p90, p99 of `values` x scale (e.g. scale=1e3 for seconds -> ms)."""
    v = sorted(x * scale for x in values)
    out = {"avg": sum(v) / len(v) if v else math.nan}
    out.update({f"p{q}": percentile(v, q) for q in (10, 50, 90, 99)})
    return {k: round(x, digits) for k, x in out.items()}


def print_table(rows: Sequence[Sequence[Any]]) -> None:
    """rows[0] is the header. First column left-aligned, the rest right-aligned."""
    cells = [["" if c is None else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = []
    for r in cells:
        parts = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines), flush=True)


def _fmt(c: Any) -> str:
    if isinstance(c, bool):
        return "yes" if c else "no"
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def write_json(name: str, obj: Any) -> Path:
    """Write obj to $OUT/name (or ./name when OUT is unset); returns the path."""
    out = Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(obj, indent=1, default=str))
    say(f"wrote {path}")
    return path


# ---- bandwidths ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for all queued device work (every stream)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_compute(device: torch.device) -> None:
    """Wait for the compute (current) stream only. Step timings use this: the transfer queue's
    copy stream keeps prefetching the next step's first offloaded layers across the step
    boundary, as it does in serving; draining it too would charge those copies, unoverlapped,
    to the step being timed."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def measure_h2d(device: torch.device, nbytes: int = 436 << 20) -> float | None:
    """Pinned host -> device bytes/s for `nbytes` copies; None on the CPU (nothing to measure)."""
    if device.type != "cuda":
        return None
    bw = measure_h2d_bytes_per_s(device, nbytes)
    free_device_memory()  # the probe's buffers must not stay cached when a worker sizes its KV cache
    return bw


def measure_d2d(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-memory copy bandwidth in bytes/s, counting bytes read + written (2 x nbytes per copy).

    On the CPU this is host memory bandwidth (smaller buffer, so tests stay quick)."""
    if device.type != "cuda":
        nbytes, iters = min(nbytes, 64 << 20), 3
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    dt = time.perf_counter() - t
    del src, dst
    free_device_memory()
    return 2 * nbytes * iters / dt


def hbm_bytes_per_step(worker: Worker, batch: int, context_len: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) a decode step must read from device memory.

    Every decoder layer (resident, or from its staging slot), the final norm and lm_head are
    read once; the embedding table only by row (ignored). KV: K and V of `context_len`
    tokens per sequence, every layer. Under tensor parallelism: one rank's (each GPU's) bytes."""
    p, m = worker.placement, worker.shard_config
    elem = worker.dtype.itemsize
    weights = m.num_layers * p.layer_bytes + (m.vocab_size + 1) * m.hidden_size * elem
    kv = batch * context_len * 2 * m.num_layers * m.num_kv_heads * m.head_dim * elem
    return weights, kv


# ---- driving Worker.execute ---------------------------------------------------------------


def random_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(n)]


class StepDriver:
    """Runs a fixed batch through `Worker.execute` as the engine would: prefill chunks under
    the token budget, then one greedy decode token per sequence per step. Owns a fresh
    block manager over the worker's KV pool; each call returns that step's seconds."""

    def __init__(self, worker: Worker, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        self.worker = worker
        self.bm = BlockManager(BlockPool(worker.num_blocks, worker.block_size))
        self.prompt_lens = [len(p) for p in prompts]
        self.seqs = [list(p) for p in prompts]  # prompt + generated
        self.done = [0] * len(prompts)  # num_computed_tokens
        self.budget = worker.token_budget  # the engine's: raised while offload is active (worker/step_cost.py)
        self.idle_budget = worker.idle_token_budget  # the engine's with nobody decoding, as in a prefill here
        self.prefill_steps = 0  # steps the last prefill() took
        bs = worker.block_size
        need = sum(-(-(len(p) + max_new_tokens) // bs) for p in prompts)
        if need > worker.num_blocks:
            raise ValueError(
                f"{len(prompts)} sequences of {max(self.prompt_lens)}+{max_new_tokens} tokens need {need} KV blocks; "
                f"the worker has {worker.num_blocks}: lower the batch or context, or give the KV cache more memory"
            )
        longest = max(self.prompt_lens) + max_new_tokens
        if longest > worker.max_model_len:
            raise ValueError(f"sequences of {longest} tokens exceed --max-model-len {worker.max_model_len}")

    def outputs(self) -> list[list[int]]:
        return [s[n:] for s, n in zip(self.seqs, self.prompt_lens)]

    def _run(self, rows: list[tuple[int, int]]) -> float:
        """rows: (sequence, tokens this step). Commits progress; appends tokens of finished prefills."""
        chunks = []
        for i, n in rows:
            start = self.done[i]
            if not self.bm.allocate_slots(i, start + n):  # capacity was checked in __init__
                raise RuntimeError(f"KV pool exhausted for sequence {i}")
            chunks.append(SeqChunk(self.seqs[i][start : start + n], start, self.bm.block_table(i)))
        steps = [len(self.seqs[i]) - self.prompt_lens[i] for i, _ in rows]
        dev = self.worker.device
        sync_compute(dev)
        t = time.perf_counter()
        tokens = [t[0] for t in self.worker.execute(chunks, [GREEDY] * len(rows), [0] * len(rows), steps).token_ids]
        sync_compute(dev)  # execute's .tolist() already waited; stated so the timing does not rely on it
        dt = time.perf_counter() - t
        for (i, n), tok in zip(rows, tokens):
            self.done[i] += n
            if self.done[i] == len(self.seqs[i]):  # last token of what we have: a real output
                self.seqs[i].append(tok)
        return dt

    def prefill(self) -> float:
        """All prompts, chunked as the scheduler would with nobody decoding (a step's first chunk of a
        fresh prompt up to the idle budget, the rest within the token budget: engine/prefill_share.py);
        returns total seconds."""
        total, self.prefill_steps = 0.0, 0
        while any(d < n for d, n in zip(self.done, self.prompt_lens)):
            self.prefill_steps += 1
            rows, taken = [], 0
            for i, n in enumerate(self.prompt_lens):
                take = chunk_tokens(n - self.done[i], self.done[i], taken, self.budget, self.idle_budget)
                if take > 0:
                    rows.append((i, take))
                    taken += take
            total += self._run(rows)
        return total

    def decode(self) -> float:
        """One decode step (one new token per sequence); returns its seconds."""
        return self._run([(i, 1) for i in range(len(self.seqs))])


def time_steps(worker: Worker, batch: int, context_len: int, n: int, warmup: int = 2, seed: int = 0) -> list[float]:
    """Seconds of each of `n` decode steps of `batch` sequences at context ~`context_len`
    (after a prefill and `warmup` untimed decode steps)."""
    prompts = random_prompts(batch, context_len, worker.model_config.vocab_size, seed)
    d = StepDriver(worker, prompts, max_new_tokens=warmup + n + 1)
    d.prefill()
    for _ in range(warmup):
        d.decode()
    return [d.decode() for _ in range(n)]


def greedy_tokens(worker: Worker, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens per prompt, batched, through Worker.execute."""
    d = StepDriver(worker, prompts, max_new_tokens=n)
    d.prefill()
    for _ in range(n - 1):
        d.decode()
    return d.outputs()


Greedy = tuple[list[list[int]], list[list[float]]]  # tokens and top-2 logit gaps, per prompt


def greedy_with_gaps(worker: Worker, prompts: Sequence[Sequence[int]], n: int) -> Greedy:
    """greedy_tokens, plus for each emitted token the gap between the top two logits it was chosen
    from (how near a tie it was: a float summation order that differs can flip a tie only).
    The model's forward is wrapped for the call to see the logits; the CUDA-graph path is not
    used by offloaded workers, which is where this is needed."""
    seen: list[torch.Tensor] = []
    orig = worker.model.forward

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = orig(*args, **kwargs)
        top = out.float().topk(2, dim=-1).values  # [S, 2]
        seen.append((top[:, 0] - top[:, 1]).cpu())
        return out

    worker.model.forward = forward  # type: ignore[method-assign]
    gaps: list[list[float]] = [[] for _ in prompts]
    try:
        d = StepDriver(worker, prompts, max_new_tokens=n)
        while any(dn < pl for dn, pl in zip(d.done, d.prompt_lens)):  # prefill, whole prompts at once
            before = [len(s) for s in d.seqs]
            rows = [(i, pl - dn) for i, (dn, pl) in enumerate(zip(d.done, d.prompt_lens)) if dn < pl]
            d._run(rows)
            for r, (i, _) in enumerate(rows):
                if len(d.seqs[i]) > before[i]:
                    gaps[i].append(float(seen[-1][r]))
        for _ in range(n - 1):
            d.decode()
            for i in range(len(prompts)):
                gaps[i].append(float(seen[-1][i]))
    finally:
        del worker.model.forward  # back to the class's method
    return d.outputs(), gaps


def first_divergence(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(prompt, position) of the first token where two greedy runs differ, or None."""
    for p, (x, y) in enumerate(zip(a, b)):
        for j, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return p, j
    return None
