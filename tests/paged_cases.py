"""Shared pieces of the Triton attention kernel tests: random paged steps, the SDPA reference,
the interpreter set-up, and the child-process runner.

Triton picks interpreter or compiler for every @triton.jit function when it is decorated,
its own standard library (tl.max, tl.sum, ...) included, i.e. when triton is first imported.
The two modes cannot share a process (triton 3.6: interpreted kernels refuse compiled tl.max,
"Cannot call @triton.jit'd outside of the scope of a kernel"; compiled kernels fail on
interpreted ones, and triton.experimental.gluon asserts on import). Setting the variable in
this process would break every later GPU test that compiles a Triton kernel in the same run.
So each kernel test file runs its interpreter tests in a child pytest whose environment has
TRITON_INTERPRET=1 from its first line, before triton is imported; in this process they skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from aioffload.attention.backends import SdpaBackend
from aioffload.worker.inputs import SeqChunk, build_inputs
from tests.helpers import one_torch_thread

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # only in the child process (see above)
CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process started by test_interpreter_cases"
)


def gpu_only(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a compiled-kernel test: `gpu`, skipped without CUDA and in the interpreter child."""
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA, no interpreter")
    return pytest.mark.gpu(skip(test))


@contextlib.contextmanager
def interpreter() -> Iterator[None]:
    """Works around triton 3.6's interpreter under numpy >= 2.4 (triton-lang/triton#9171): a scalar
    loaded from memory is a 1-element array whose `__index__` (used by `range(lo, hi, BLOCK_N)`)
    calls int() on it, which numpy 2.4 rejects. One torch thread: the interpreter is numpy-bound."""
    from triton.runtime import interpreter as triton_interpreter

    original = triton_interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    triton_interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        with one_torch_thread():
            yield
    finally:
        triton_interpreter._patch_lang_tensor = original


def random_step(step, block_size, num_kv_heads, group, head_dim, dtype, device, seed=0, q_strided=False):
    """Random q/k/v and a random paged cache whose blocks are handed out in shuffled order.
    `step` is (start, num_tokens) per sequence. Every slot, owned or not, holds random data, so a
    wrong block or position shows up."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(start + n) // block_size) for start, n in step]
    num_blocks = sum(need) + 5
    free = torch.randperm(num_blocks, generator=g).tolist()
    chunks = [SeqChunk([0] * n, start, [free.pop() for _ in range(nb)]) for (start, n), nb in zip(step, need)]
    inp = build_inputs(chunks, block_size, CPU)
    t, hq = inp.input_ids.numel(), num_kv_heads * group

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    if q_strided:  # q as the model's view of a fused projection: rows are not contiguous
        q = rand(t, hq + 2 * num_kv_heads, head_dim)[:, :hq]
        assert not q.is_contiguous()
    else:
        q = rand(t, hq, head_dim)
    k, v = rand(t, num_kv_heads, head_dim), rand(t, num_kv_heads, head_dim)
    cache_shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = rand(*cache_shape), rand(*cache_shape)
    meta = inp.meta
    if device.type != "cpu":
        for name in ("slot_mapping", "block_tables", "row_seq", "row_ctx", "last_token_idx", "prefill_tiles",
                     "decode_rows"):  # fmt: skip
            if getattr(meta, name) is not None:
                setattr(meta, name, getattr(meta, name).to(device))
    return q, k, v, k_cache, v_cache, meta


def sdpa_reference(q, k, v, k_cache, v_cache, meta, scale):
    """SdpaBackend in float32 on the same values (writes this step's K/V into the given caches)."""
    kc32, vc32 = k_cache.float(), v_cache.float()
    out = SdpaBackend().forward(q.float(), k.float(), v.float(), kc32, vc32, meta, scale)
    k_cache.copy_(kc32)  # the same write, in the caller's dtype
    v_cache.copy_(vc32)
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# Float32 is exact up to summation order; half types round p and the output.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # bf16: as the GPU tests


def run_interpreter_child(test_file: str, expected: int) -> None:
    """Every `interpreted` test of test_file, in a child pytest started with TRITON_INTERPRET=1."""
    here = Path(test_file).resolve()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted", str(here)],
        cwd=here.parents[1], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=420,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == expected, out[-6000:]
    assert "skipped" not in out and "failed" not in out, out[-6000:]
