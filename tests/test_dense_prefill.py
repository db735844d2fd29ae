"""Long chunks through cuDNN (attention/dense_prefill.py): the gather / split / LSE-merge logic on
the CPU with the plain-PyTorch attention call, the step inputs that route chunks to it, and on a
GPU the cuDNN path against the Triton kernels."""

from __future__ import annotations

import pytest
import torch

from aioffload.attention import dense_prefill
from aioffload.attention.dense_prefill import attend_dense, math_lse_attention, probe_cudnn
from aioffload.worker.inputs import SeqChunk, build_inputs
from tests.paged_cases import CPU, TOL, gpu_only, max_err, random_step, sdpa_reference

# (start, rows) per sequence: a fresh prompt, a chunk after a cached prefix that is not a whole
# number of blocks, a decode row, a chunk after a one-token prefix.
STEP = [(0, 40), (37, 29), (9, 1), (1, 17)]
DENSE = [0, 1, 3]  # the multi-row sequences


@pytest.mark.parametrize(
    ("group", "head_dim", "block_size", "dtype"),
    [(1, 64, 16, torch.float32), (4, 128, 32, torch.float32), (8, 64, 16, torch.float32),
     (4, 64, 16, torch.bfloat16)],
)  # fmt: skip
def test_dense_chunks_equal_sdpa_over_the_paged_cache(group, head_dim, block_size, dtype):
    q, k, v, k_cache, v_cache, meta = random_step(STEP, block_size, 2, group, head_dim, dtype, CPU, seed=3)
    scale = head_dim**-0.5
    want = sdpa_reference(q, k, v, k_cache, v_cache, meta, scale)  # writes this step's K/V into the caches
    rows, first = [], 0
    for s, (start, n) in enumerate(STEP):
        if s in DENSE:
            rows.append((s, first, n, start))
        first += n
    # grain 16 (the production grain is at least DENSE_PAD): every call is padded to multiples of 16 rows
    got = attend_dense(q, k_cache, v_cache, meta.block_tables, rows, scale, torch.zeros_like(q), math_lse_attention,
                       16)  # fmt: skip
    for s, row0, n, _ in rows:
        assert max_err(got[row0 : row0 + n], want[row0 : row0 + n]) < TOL[dtype], f"sequence {s}"
    assert not got[40 + 29].any(), "the decode row is left alone"


def test_math_lse_attention_returns_the_log_sum_exp():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, 16, generator=g) for n in (5, 7, 7))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 KV heads for 4 query heads
    out, lse = math_lse_attention(q, k, v, False, 0.25)
    s = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.25
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-6)
    assert torch.allclose(out, torch.softmax(s, -1) @ v.repeat_interleave(2, dim=1), atol=1e-6)
    _, lse_causal = math_lse_attention(q, k[:, :, :5], v[:, :, :5], True, 0.25)
    assert torch.allclose(lse_causal[0, :, 0], s[0, :, 0, 0], atol=1e-6), "row 0 sees key 0 only"


def test_build_inputs_routes_long_chunks_to_the_dense_path_and_the_rest_to_tiles():
    chunks = [SeqChunk([0] * 40, 0, [0, 1, 2]), SeqChunk([0], 9, [3]), SeqChunk([0] * 17, 1, [4, 5]),
              SeqChunk([0] * 30, 70, [6, 7, 8, 9, 10, 11, 12])]  # fmt: skip
    plain = build_inputs(chunks, 16, CPU)
    assert plain.meta.dense_seqs is None
    assert sorted(t[0] for t in plain.meta.prefill_tiles.tolist()) == [0, 2, 3]
    routed = build_inputs(chunks, 16, CPU, dense_min_rows=30)
    assert routed.meta.dense_seqs == [(0, 0, 40, 0), (3, 58, 30, 70)]  # (sequence, first row, rows, first position)
    assert routed.meta.prefill_tiles.tolist() == [[2, 41, 17, 1]]
    assert routed.meta.decode_rows.tolist() == [40]
    everything = build_inputs(chunks, 16, CPU, dense_min_rows=2)
    assert everything.meta.prefill_tiles.shape == (0, 4)
    assert [s for s, *_ in everything.meta.dense_seqs] == [0, 2, 3]


def test_a_decode_only_step_has_no_dense_chunks():
    meta = build_inputs([SeqChunk([0], 5, [0]), SeqChunk([0], 3, [1])], 16, CPU, dense_min_rows=1).meta
    assert meta.dense_seqs is None and meta.prefill_tiles is None


def test_warming_fixes_the_grain_and_keeps_shorter_chunks_on_the_tiles(monkeypatch):
    pytest.importorskip("triton", reason="the Triton backend imports its kernels")
    from aioffload.attention.backends import TritonPagedBackend

    calls = []
    monkeypatch.setattr(dense_prefill, "warm", lambda *a: calls.append(a) or 7)
    backend = TritonPagedBackend()
    backend.warm_dense(32, 8, 128, torch.bfloat16, CPU, 32768, 40000)
    assert calls == [] and backend.dense_min_rows is None  # no dense path (no probe passed): nothing to warm
    backend.dense_min_rows = dense_prefill.DENSE_MIN_ROWS
    backend.warm_dense(32, 8, 128, torch.bfloat16, CPU, 2048, 40000)
    assert (backend.dense_grain, backend.dense_min_rows) == (1024, 1024)
    backend.warm_dense(32, 8, 128, torch.bfloat16, CPU, 32768, 40000)
    assert (backend.dense_grain, backend.dense_min_rows) == (8192, 8192)  # a 1500-row prompt stays on the tiles
    assert [c[5:] for c in calls] == [(2048, 40000), (32768, 40000)]


def test_the_probe_refuses_a_cpu_device():
    assert probe_cudnn(CPU) == "not a CUDA device"


@gpu_only
def test_the_cudnn_probe_passes_and_the_backend_logs_it(caplog):
    from aioffload.attention.backends import select_backend

    dev = torch.device("cuda")
    assert probe_cudnn(dev) is None
    with caplog.at_level("INFO", logger="aioffload.attention"):
        backend = select_backend("auto", dev)
    assert backend.dense_min_rows == dense_prefill.DENSE_MIN_ROWS
    assert "cuDNN for eager chunks" in caplog.text


@pytest.mark.parametrize("start", [0, 5, 16, 47, 70])
def test_every_grain_gives_the_same_rows(start):
    """Grain 1 is no padding at all; 16 and 64 pad the calls (and split the prefix at 0, 16, 32 or 64)."""
    q, k, v, k_cache, v_cache, meta = random_step([(start, 37)], 16, 2, 4, 64, torch.float32, CPU, seed=8)
    want = sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    for grain in (1, 16, 64):
        got = attend_dense(q, k_cache, v_cache, meta.block_tables, [(0, 0, 37, start)], 0.125, torch.zeros_like(q),
                           math_lse_attention, grain)  # fmt: skip
        assert max_err(got, want) < 1e-5, f"grain {grain}"


def test_a_chunks_own_square_pads_to_256_rows_and_its_prefix_to_the_grain():
    q, k, v, k_cache, v_cache, meta = random_step([(2100, 300)], 16, 2, 4, 64, torch.float32, CPU, seed=4)
    want = sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    shapes = []

    def spy(q_, k_, v_, causal, scale):  # type: ignore[no-untyped-def]
        shapes.append((q_.shape[2], k_.shape[2], causal))
        return math_lse_attention(q_, k_, v_, causal, scale)

    got = attend_dense(q, k_cache, v_cache, meta.block_tables, [(0, 0, 300, 2100)], 0.125, torch.zeros_like(q), spy,
                       1024)  # fmt: skip
    # rows at 2100 .. 2399: the square from 2048 holds 52 + 300 rows in 512; the prefix 0 .. 2047 in 1024 rows
    assert shapes == [(512, 512, True), (1024, 2048, False)]
    assert max_err(got, want) < 1e-5
    fresh = []
    attend_dense(q, k_cache, v_cache, meta.block_tables, [(0, 0, 300, 0)], 0.125, torch.zeros_like(q),
                 lambda *a: fresh.append(a[0].shape[2]) or math_lse_attention(*a), 1024)  # fmt: skip
    assert fresh == [512]  # a fresh 300-row chunk: one square of 512, not of the 1024 grain


def test_rows_that_fill_their_call_are_passed_without_a_copy():
    x = torch.randn(512, 4, 16)
    view = dense_prefill.padded(x, 512)
    assert view.shape == (1, 4, 512, 16) and view.data_ptr() == x.data_ptr()
    assert view.stride() == dense_prefill.padded(x[:300], 512).stride()  # one cuDNN plan serves both
    copy = dense_prefill.padded(x[:300], 512)
    assert copy.data_ptr() != x.data_ptr() and not copy[0, :, 300:].any()
    cache = torch.randn(40, 16, 2, 16)
    table = torch.arange(40, dtype=torch.int32)
    full = dense_prefill.gather_padded(cache, table, 32, 544, 512)
    part = dense_prefill.gather_padded(cache, table, 32, 300, 512)
    assert full.stride() == part.stride() and torch.equal(full[0, :, :268], part[0, :, :268])
    assert torch.equal(full[0].transpose(0, 1), cache.flatten(0, 1)[32:544]) and not part[0, :, 268:].any()


def test_the_grain_keeps_a_step_to_four_query_sizes():
    assert [dense_prefill.grain_for(n) for n in (512, 2048, 4096, 8192, 14246, 32768)] == [1024, 1024, 1024, 2048,
                                                                                          4096, 8192]  # fmt: skip


@gpu_only
@pytest.mark.parametrize("group", [1, 4, 8])
def test_cudnn_chunks_equal_the_triton_kernels_on_a_mixed_step(group):
    from aioffload.attention.backends import TritonPagedBackend

    dev = torch.device("cuda")
    step = [(0, 1500), (3000, 1100), (700, 1), (0, 1030), (40, 300), (5000, 1)]  # three chunks for cuDNN
    q, k, v, k_cache, v_cache, meta = random_step(step, 16, 2, group, 128, torch.bfloat16, dev, seed=5)
    scale = 128**-0.5
    tiles = TritonPagedBackend()
    want = tiles.forward(q, k, v, k_cache, v_cache, meta, scale)
    chunks_meta = build_inputs(
        [SeqChunk([0] * n, start, meta.block_tables[s].tolist()) for s, (start, n) in enumerate(step)], 16, CPU,
        dense_min_rows=1024,
    ).meta
    assert [s for s, *_ in chunks_meta.dense_seqs] == [0, 1, 3]
    for name in ("slot_mapping", "block_tables", "row_seq", "row_ctx", "last_token_idx", "prefill_tiles",
                 "decode_rows"):  # fmt: skip
        setattr(chunks_meta, name, getattr(chunks_meta, name).to(dev))
    got = tiles.attend(q, k_cache, v_cache, chunks_meta, scale)  # grain 1024: the 1100 rows at 3000 split at 2048
    assert max_err(got, want) < TOL[torch.bfloat16]


@gpu_only
def test_warm_runs_every_shape_a_step_can_give():
    # grain 1024: squares of 256, 512, .. 3072 rows; prefixes of 1024 .. 4096 keys for 1024 rows, of
    # 1024 .. 3072 for 2048 rows (a 2048-row chunk ends by position 5120)
    assert dense_prefill.warm(32, 8, 128, torch.bfloat16, torch.device("cuda"), 2048, 5120) == 12 + 4 + 3
    # a lone prompt's step past that budget, up to 4000 rows: squares of 2304 .. 4096
    assert dense_prefill.warm_squares(32, 8, 128, torch.bfloat16, torch.device("cuda"), 2048, 4000, 1024) == 8
