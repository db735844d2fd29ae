"""The Triton paged-attention kernel against SdpaBackend.

On the CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1); on a GPU, a
`gpu`-marked test compares the compiled kernel in bfloat16.

Triton picks interpreter or compiler for every @triton.jit function when it is decorated,
its own standard library (tl.max, tl.sum, ...) included, i.e. when triton is first imported.
The two modes cannot share a process (triton 3.6: interpreted kernels refuse compiled tl.max,
"Cannot call @triton.jit'd outside of the scope of a kernel"; compiled kernels fail on
interpreted ones, and triton.experimental.gluon asserts on import). Setting the variable here
would break every later GPU test that compiles a Triton kernel in the same pytest run. So
`test_interpreter_cases` runs the interpreter tests in a child pytest whose environment has
TRITON_INTERPRET=1 from its first line, before triton is imported; in this process they skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aioffload.attention.backends import SdpaBackend, TritonPagedBackend
from aioffload.worker.inputs import SeqChunk, build_inputs
from tests.helpers import one_torch_thread

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # only in the child process (see above)
triton = pytest.importorskip("triton", reason="triton is not importable; the paged-attention kernel needs it")

CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process started by test_interpreter_cases"
)


@pytest.fixture
def interpreted():
    """aioffload.attention.paged_kernel under the interpreter. Also works around triton 3.6's interpreter under
    numpy >= 2.4 (triton-lang/triton#9171): a scalar loaded from memory is a 1-element array whose
    `__index__` (used by `range(0, ctx, BLOCK_N)`) calls int() on it, which numpy 2.4 rejects."""
    from triton.runtime import interpreter as triton_interpreter

    from aioffload.attention import paged_kernel

    original = triton_interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    triton_interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        with one_torch_thread():
            yield paged_kernel
    finally:
        triton_interpreter._patch_lang_tensor = original


# (start, num_tokens) per sequence: decode rows (one token after a prefix) and prefill chunks, with
# and without a prefix. Context lengths cross the kernel's 64-key tiles and the block boundaries.
STEP = [(69, 1), (4, 1), (13, 5), (0, 6), (0, 1), (61, 3)]


def random_step(step, block_size, num_kv_heads, group, head_dim, dtype, device, seed=0, q_strided=False):
    """Random q/k/v and a random paged cache whose blocks are handed out in shuffled order.
    Every slot, owned or not, holds random data, so a wrong block or position shows up."""
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
        for name in ("slot_mapping", "block_tables", "row_seq", "row_ctx", "last_token_idx"):
            setattr(meta, name, getattr(meta, name).to(device))
    return q, k, v, k_cache, v_cache, meta


def sdpa_reference(q, k, v, k_cache, v_cache, meta, scale):
    """SdpaBackend in float32 on the same values (writes this step's K/V into the given caches)."""
    kc32, vc32 = k_cache.float(), v_cache.float()
    out = SdpaBackend().forward(q.float(), k.float(), v.float(), kc32, vc32, meta, scale)
    k_cache.copy_(kc32)  # the same write, in the caller's dtype
    v_cache.copy_(vc32)
    return out


def paged(kernel, q, k_cache, v_cache, meta, scale, rows=slice(None), extra_ctx=0):
    """kernel.paged_attention on the query rows `rows` of a step (all by default)."""
    row_seq, row_ctx = meta.row_seq[rows], meta.row_ctx[rows] + extra_ctx
    return kernel.paged_attention(q[rows], k_cache, v_cache, meta.block_tables, row_seq, row_ctx, scale)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# Every pair of (group, head_dim, block_size, dtype) values appears at least once.
CASES = [
    (1, 32, 4, torch.float32),
    (1, 64, 16, torch.float16),
    (4, 32, 16, torch.float32),
    (4, 64, 4, torch.float16),
    (8, 32, 4, torch.float16),
    (8, 64, 16, torch.float32),
]


@needs_interpreter
@pytest.mark.parametrize("group, head_dim, block_size, dtype", CASES)
def test_interpreted_kernel_matches_sdpa(interpreted, group, head_dim, block_size, dtype):
    q, k, v, k_cache, v_cache, meta = random_step(STEP, block_size, 2, group, head_dim, dtype, CPU)
    scale = head_dim**-0.5
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, scale)
    out = paged(interpreted, q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == dtype
    err = max_err(out, ref)
    assert err < TOL[dtype], f"max abs error {err}"
    # Also against SdpaBackend in the same dtype, within that dtype's rounding.
    native = SdpaBackend().forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale)
    assert max_err(out, native) < 2 * TOL[dtype] + (0 if dtype == torch.float32 else 2e-3)


@needs_interpreter
def test_interpreted_kernel_rows_are_independent(interpreted):
    """Each row sees exactly its own sequence's first row_ctx keys: a step of one row gives that
    row's result from the mixed step, and one key more changes it."""
    q, k, v, k_cache, v_cache, meta = random_step(STEP, 4, 2, 4, 32, torch.float32, CPU, seed=3)
    scale = 32**-0.5
    sdpa_reference(q, k, v, k_cache, v_cache, meta, scale)
    out = paged(interpreted, q, k_cache, v_cache, meta, scale)
    for row in (0, 4, 15):  # a decode row (2 key tiles), a mid-chunk row, a 1-token prefill
        one = paged(interpreted, q, k_cache, v_cache, meta, scale, rows=slice(row, row + 1))
        assert torch.equal(one[0], out[row]), f"row {row}"
        more = paged(interpreted, q, k_cache, v_cache, meta, scale, rows=slice(row, row + 1), extra_ctx=1)
        assert max_err(more[0], out[row]) > 1e-4, f"row {row} ignores row_ctx"


@needs_interpreter
def test_interpreted_kernel_with_strided_q(interpreted):
    step = [(69, 1), (5, 4)]
    q, k, v, k_cache, v_cache, meta = random_step(step, 16, 2, 4, 64, torch.float32, CPU, 1, q_strided=True)
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    out = paged(interpreted, q, k_cache, v_cache, meta, 0.125)
    assert max_err(out, ref) < 1e-5


@needs_interpreter
def test_interpreted_triton_backend_writes_kv_then_attends(interpreted):
    """TritonPagedBackend (with the interpreted kernel) == SdpaBackend, including the K/V write."""
    backend = TritonPagedBackend()
    q, k, v, k_cache, v_cache, meta = random_step([(9, 1), (3, 4)], 4, 2, 8, 32, torch.float32, CPU, seed=2)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 32**-0.5)
    ref = SdpaBackend().forward(q, k, v, kc, vc, meta, 32**-0.5)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    assert max_err(out, ref) < 1e-5


NUM_INTERPRETED_TESTS = len(CASES) + 3


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases():
    """Every interpreter test above, in a child pytest started with TRITON_INTERPRET=1."""
    here = Path(__file__).resolve()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted", str(here)],
        cwd=here.parents[1], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == NUM_INTERPRETED_TESTS, out[-6000:]
    assert "skipped" not in out and "failed" not in out, out[-6000:]


# ---- the compiled kernel on a GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA, no interpreter")
@pytest.mark.parametrize(
    "step",
    [
        pytest.param([(0, n) for n in (1, 17, 100, 64, 257)], id="varlen-prefill"),
        pytest.param([(n - 1, 1) for n in (1, 2, 63, 64, 65, 300, 1000, 4097)], id="paged-decode"),
        pytest.param([(300, 1), (0, 33), (128, 70), (7, 1)], id="mixed"),
    ],
)
@pytest.mark.parametrize("group, head_dim, block_size", [(4, 128, 16), (8, 64, 16), (1, 128, 32)])
def test_cuda_kernel_matches_sdpa_bf16(step, group, head_dim, block_size):
    from aioffload.attention import paged_kernel as compiled
    dev = torch.device("cuda")
    q, k, v, k_cache, v_cache, meta = random_step(step, block_size, 4, group, head_dim, torch.bfloat16, dev)
    scale = head_dim**-0.5
    native = SdpaBackend().forward(q, k, v, k_cache, v_cache, meta, scale)  # bf16 SDPA, writes K/V
    kc32, vc32 = k_cache.float(), v_cache.float()
    exact = SdpaBackend().forward(q.float(), k.float(), v.float(), kc32, vc32, meta, scale)
    out = paged(compiled, q, k_cache, v_cache, meta, scale)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert max_err(out, exact) < 2e-2, f"vs float32 SDPA: {max_err(out, exact)}"
    assert max_err(out, native) < 3e-2, f"vs bfloat16 SDPA: {max_err(out, native)}"
    # The error is rounding, not a wrong key: it is far below what one misplaced key would cause.
    assert (out.float() - exact).abs().mean().item() < 2e-3
