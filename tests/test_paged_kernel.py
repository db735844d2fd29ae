"""The Triton row-wise paged-attention kernel (decode rows, split-KV) against SdpaBackend.

On the CPU the kernel runs under the Triton interpreter in a child process (see
tests/paged_cases.py for why); on a GPU, `gpu`-marked tests compare the compiled kernel in
bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from aioffload.attention.backends import SdpaBackend, TritonPagedBackend
from tests.paged_cases import (
    CPU,
    INTERPRETED,
    TOL,
    gpu_only,
    interpreter,
    max_err,
    needs_interpreter,
    random_step,
    run_interpreter_child,
    sdpa_reference,
)

triton = pytest.importorskip("triton", reason="triton is not importable; the paged-attention kernel needs it")


@pytest.fixture
def interpreted():
    """aioffload.attention.paged_kernel under the interpreter (child process only)."""
    from aioffload.attention import paged_kernel

    with interpreter():
        yield paged_kernel


# (start, num_tokens) per sequence: decode rows (one token after a prefix) and prefill chunks, with
# and without a prefix. Context lengths cross the kernel's 64-key tiles and the block boundaries.
STEP = [(69, 1), (4, 1), (13, 5), (0, 6), (0, 1), (61, 3)]


def paged(kernel, q, k_cache, v_cache, meta, scale, rows=slice(None), extra_ctx=0):
    """kernel.paged_attention on the query rows `rows` of a step (all by default)."""
    row_seq, row_ctx = meta.row_seq[rows], meta.row_ctx[rows] + extra_ctx
    return kernel.paged_attention(q[rows], k_cache, v_cache, meta.block_tables, row_seq, row_ctx, scale)


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


# ---- split-KV (flash-decoding) ----

# Decode rows at contexts across the 64-key tiles, one long enough for many splits; with 32
# splits most of them are empty at these contexts (they must contribute nothing).
DECODE_STEP = [(n - 1, 1) for n in (1, 64, 65, 300, 1000)]
# (splits, group, head_dim, block_size, dtype): split counts 2, 3 (not a power of two), 8, 32.
SPLIT_CASES = [
    (2, 4, 64, 16, torch.float32),
    (3, 8, 32, 32, torch.float16),
    (8, 1, 128, 16, torch.bfloat16),
    (32, 4, 64, 32, torch.float32),
]


def split_kv(kernel, q, k_cache, v_cache, meta, scale, splits, out=None, rows=None, **kw):
    """kernel.paged_attention with `splits` splits on every row of a step (or on `rows`)."""
    return kernel.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.row_seq, meta.row_ctx, scale, out,
                                  rows, splits, **kw)  # fmt: skip


def counters_are_zero(kernel) -> bool:
    """The persistent split counters of the CPU are all back at zero (what the next launch needs)."""
    return not kernel._counters[CPU].any()


def counters_are_zero_but(counters: torch.Tensor, i: int) -> bool:
    return not torch.cat([counters[:i], counters[i + 1 :]]).any()


@needs_interpreter
@pytest.mark.parametrize("splits, group, head_dim, block_size, dtype", SPLIT_CASES)
def test_interpreted_split_kv_matches_sdpa(interpreted, splits, group, head_dim, block_size, dtype):
    q, k, v, k_cache, v_cache, meta = random_step(DECODE_STEP, block_size, 1, group, head_dim, dtype, CPU, seed=5)
    scale = head_dim**-0.5
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, scale)
    out = split_kv(interpreted, q, k_cache, v_cache, meta, scale, splits)  # the last split program combines
    assert out.dtype == dtype
    assert max_err(out, ref) < TOL[dtype], f"max abs error {max_err(out, ref)}"
    assert counters_are_zero(interpreted)
    # The separate combine launch: the same arithmetic on the same partials, summed in another order.
    separate = split_kv(interpreted, q, k_cache, v_cache, meta, scale, splits, combine_kernel=True)
    assert max_err(separate, out) < (2e-6 if dtype == torch.float32 else TOL[dtype])
    one = interpreted.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.row_seq, meta.row_ctx, scale)
    if dtype == torch.float32:  # the same sums in another order
        assert max_err(out, one) < 2e-6


@needs_interpreter
@pytest.mark.parametrize("group, block_size", [(4, 16), (1, 32), (8, 32)])
def test_interpreted_split_kv_computes_only_the_listed_rows(interpreted, group, block_size):
    """With `rows`, only those rows of a mixed step are written (the decode rows of tiles.plan_rows);
    the counters are per listed row and KV head."""
    step = [(299, 1), (0, 5), (40, 1)]
    q, k, v, k_cache, v_cache, meta = random_step(step, block_size, 2, group, 32, torch.float32, CPU, seed=6)
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, 32**-0.5)
    assert meta.decode_rows.tolist() == [0, 6]
    out = torch.full_like(q, float("nan"))
    split_kv(interpreted, q, k_cache, v_cache, meta, 32**-0.5, 4, out, meta.decode_rows)
    assert max_err(out[[0, 6]], ref[[0, 6]]) < 1e-5
    assert out[1:6].isnan().all()
    assert counters_are_zero(interpreted)


@needs_interpreter
def test_interpreted_split_kv_twice_gives_the_same_result(interpreted):
    """The last program leaves its counter at zero, so a second launch on the same inputs (what a CUDA
    graph replay is) combines again, after all of its splits, to the same output. Group 8 at D 128
    combines 16 splits at a time: 24 splits of the 1500-key row take two tiles, the second one partly
    masked (the other rows leave splits empty in both)."""
    step = [(n - 1, 1) for n in (1, 65, 1500)]
    q, k, v, k_cache, v_cache, meta = random_step(step, 32, 2, 8, 128, torch.float32, CPU, seed=8)
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, 128**-0.5)
    assert interpreted.COMBINE_TILE // (8 * 128) == 16
    first = split_kv(interpreted, q, k_cache, v_cache, meta, 128**-0.5, 24)
    assert counters_are_zero(interpreted)
    out = torch.full_like(q, float("nan"))
    second = split_kv(interpreted, q, k_cache, v_cache, meta, 128**-0.5, 24, out)
    assert second is out and torch.equal(second, first)
    assert max_err(first, ref) < 1e-5
    assert counters_are_zero(interpreted)


@needs_interpreter
def test_interpreted_split_kv_combines_only_in_the_last_program(interpreted):
    """Only the program that counts num_splits - 1 writes output: with one counter off by num_splits,
    its (row, KV head) goes unwritten (and its counter unreset) while every other one is combined."""
    q, k, v, k_cache, v_cache, meta = random_step(DECODE_STEP, 16, 2, 4, 32, torch.float32, CPU, seed=9)
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, 32**-0.5)
    split_kv(interpreted, q, k_cache, v_cache, meta, 32**-0.5, 3)  # creates the counters
    counters = interpreted._counters[CPU]
    counters[3 * 2 + 1] = 3  # row 3, KV head 1
    try:
        out = split_kv(interpreted, q, k_cache, v_cache, meta, 32**-0.5, 3, torch.full_like(q, float("nan")))
        assert counters[7].item() == 6 and counters_are_zero_but(counters, 7)
    finally:
        counters.zero_()
    assert out[3, 4:].isnan().all()  # query heads 4..7: the group of KV head 1
    written = torch.ones(q.shape[:2], dtype=torch.bool)
    written[3, 4:] = False
    assert max_err(out[written], ref[written]) < 1e-5


@needs_interpreter
def test_interpreted_backend_decode_step_uses_splits(interpreted):
    """A decode-only step through TritonPagedBackend (no prefill tiles: the CUDA-graph shape) splits
    its one long row over the context and matches SDPA."""
    backend = TritonPagedBackend()
    q, k, v, k_cache, v_cache, meta = random_step([(700, 1)], 16, 1, 4, 64, torch.float32, CPU, seed=7)
    assert meta.prefill_tiles is None and backend._splits(1, 1, CPU) == 8
    kc, vc = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.125)
    ref = SdpaBackend().forward(q, k, v, kc, vc, meta, 0.125)
    assert max_err(out, ref) < 1e-5


def test_num_splits_fills_the_machine_with_a_fixed_grid():
    from aioffload.attention.paged_kernel import MAX_SPLITS, num_splits

    sms = 132  # H100/H200
    assert num_splits(1, 8, sms) == MAX_SPLITS == 32  # batch 1, Llama-3-8B: 8 x 32 = 256 programs
    assert num_splits(4, 8, sms) == 8
    assert num_splits(16, 8, sms) == 2
    assert num_splits(17, 8, sms) == 1  # 136 programs already cover the SMs
    assert num_splits(64, 8, sms) == 1
    assert num_splits(1, 1, 4) == 8


def test_split_counters_persist_and_grow_outside_capture():
    """One zeroed buffer per device, reused while large enough; a larger need replaces it (after the
    old one has been kept alive for the graphs that captured it)."""
    from aioffload.attention import paged_kernel

    dev = torch.device("cpu")
    saved, retired = paged_kernel._counters.pop(dev, None), len(paged_kernel._retired)
    try:
        first = paged_kernel.split_counters(dev, 8)
        assert first.dtype == torch.int32 and first.numel() == paged_kernel.MIN_COUNTERS and not first.any()
        assert paged_kernel.split_counters(dev, paged_kernel.MIN_COUNTERS) is first
        grown = paged_kernel.split_counters(dev, paged_kernel.MIN_COUNTERS + 1)
        assert grown.numel() == paged_kernel.MIN_COUNTERS + 1 and not grown.any()
        assert paged_kernel._retired[-1] is first and paged_kernel.split_counters(dev, 8) is grown
    finally:
        del paged_kernel._retired[retired:]
        paged_kernel._counters.pop(dev, None)
        if saved is not None:
            paged_kernel._counters[dev] = saved


NUM_INTERPRETED_TESTS = len(CASES) + 3 + len(SPLIT_CASES) + 3 + 3


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases():
    """Every interpreter test above, in a child pytest started with TRITON_INTERPRET=1."""
    run_interpreter_child(__file__, NUM_INTERPRETED_TESTS)


# ---- the compiled kernel on a GPU ----


@pytest.mark.parametrize("splits", [1, 8])
@pytest.mark.parametrize(
    "step",
    [
        pytest.param([(0, n) for n in (1, 17, 100, 64, 257)], id="varlen-prefill"),
        pytest.param([(n - 1, 1) for n in (1, 2, 63, 64, 65, 300, 1000, 4097)], id="paged-decode"),
        pytest.param([(300, 1), (0, 33), (128, 70), (7, 1)], id="mixed"),
    ],
)
@pytest.mark.parametrize("group, head_dim, block_size", [(4, 128, 16), (8, 64, 16), (1, 128, 32)])
@gpu_only
def test_cuda_kernel_matches_sdpa_bf16(step, group, head_dim, block_size, splits):
    from aioffload.attention import paged_kernel as compiled

    dev = torch.device("cuda")
    q, k, v, k_cache, v_cache, meta = random_step(step, block_size, 4, group, head_dim, torch.bfloat16, dev)
    scale = head_dim**-0.5
    native = SdpaBackend().forward(q, k, v, k_cache, v_cache, meta, scale)  # bf16 SDPA, writes K/V
    kc32, vc32 = k_cache.float(), v_cache.float()
    exact = SdpaBackend().forward(q.float(), k.float(), v.float(), kc32, vc32, meta, scale)
    out = compiled.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.row_seq, meta.row_ctx, scale,
                                   splits=splits)  # fmt: skip
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert max_err(out, exact) < 2e-2, f"vs float32 SDPA: {max_err(out, exact)}"
    assert max_err(out, native) < 3e-2, f"vs bfloat16 SDPA: {max_err(out, native)}"
    # The error is rounding, not a wrong key: it is far below what one misplaced key would cause.
    assert (out.float() - exact).abs().mean().item() < 2e-3


@gpu_only
def test_cuda_split_kv_at_32k_context_bf16():
    """Batch-1 decode at 32k context, the case split-KV exists for, with the backend's split count."""
    from aioffload.attention import paged_kernel as compiled

    dev = torch.device("cuda")
    q, k, v, k_cache, v_cache, meta = random_step([(32767, 1)], 16, 8, 4, 128, torch.bfloat16, dev, seed=9)
    kc32, vc32 = k_cache.float(), v_cache.float()
    exact = SdpaBackend().forward(q.float(), k.float(), v.float(), kc32, vc32, meta, 128**-0.5)
    k_cache.copy_(kc32)
    v_cache.copy_(vc32)
    splits = TritonPagedBackend()._splits(1, 8, dev)
    out = compiled.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.row_seq, meta.row_ctx, 128**-0.5,
                                   splits=splits)  # fmt: skip
    torch.cuda.synchronize()
    assert splits == 32 and max_err(out, exact) < 1e-2


@gpu_only
def test_cuda_split_kv_graph_replays_reset_the_counters():
    """Under a CUDA graph (what the decode step runs): each replay combines in the last split program
    and leaves the counters at zero, so replays at the captured and at a new context match eager."""
    from aioffload.attention import paged_kernel as compiled

    dev = torch.device("cuda")
    q, k, v, k_cache, v_cache, meta = random_step([(4999, 1), (700, 1)], 16, 8, 4, 128, torch.bfloat16, dev, seed=4)
    sdpa_reference(q, k, v, k_cache, v_cache, meta, 128**-0.5)  # writes this step's K/V

    def call():
        return split_kv(compiled, q, k_cache, v_cache, meta, 128**-0.5, 16)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = call()  # the warm-up before capture: compiles, creates the counters
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for ctx in (None, (1234, 3)):  # the captured contexts, then new ones in place
        if ctx is not None:
            meta.row_ctx.copy_(torch.tensor(ctx, dtype=meta.row_ctx.dtype))
            eager = call()
        for _ in range(20):  # a missed ordering would show as a mismatch now and then
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager)
            assert not compiled._counters[q.device].any()
    separate = split_kv(compiled, q, k_cache, v_cache, meta, 128**-0.5, 16, combine_kernel=True)
    assert max_err(out, separate) <= 1e-2
