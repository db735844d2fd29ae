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
    # pad 16: the 40-row fresh prompt is padded to 48 rows (the production pad is DENSE_PAD)
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
    assert routed.meta.dense_seqs == [(0, 0, 40, 0)]  # (sequence, first row, rows, first position): fresh only
    assert sorted(t[0] for t in routed.meta.prefill_tiles.tolist()) == [2, 3]  # the chunk after 70 cached tokens
    assert routed.meta.decode_rows.tolist() == [40]
    fresh = build_inputs(chunks[:2], 16, CPU, dense_min_rows=2)
    assert fresh.meta.prefill_tiles.shape == (0, 4) and fresh.meta.dense_seqs == [(0, 0, 40, 0)]


def test_a_decode_only_step_has_no_dense_chunks():
    meta = build_inputs([SeqChunk([0], 5, [0]), SeqChunk([0], 3, [1])], 16, CPU, dense_min_rows=1).meta
    assert meta.dense_seqs is None and meta.prefill_tiles is None


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


def test_padding_a_fresh_chunk_changes_none_of_its_rows():
    q, k, v, k_cache, v_cache, meta = random_step([(0, 37)], 16, 2, 4, 64, torch.float32, CPU, seed=8)
    sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    outs = [attend_dense(q, k_cache, v_cache, meta.block_tables, [(0, 0, 37, 0)], 0.125, torch.zeros_like(q),
                         math_lse_attention, pad) for pad in (1, 16, 64)]  # fmt: skip
    assert max_err(outs[1], outs[0]) < 1e-5 and max_err(outs[2], outs[0]) < 1e-5


@gpu_only
@pytest.mark.parametrize("group", [1, 4, 8])
def test_cudnn_chunks_equal_the_triton_kernels_on_a_mixed_step(group):
    from aioffload.attention.backends import TritonPagedBackend

    dev = torch.device("cuda")
    step = [(0, 1500), (3000, 1100), (700, 1), (0, 1030), (40, 300), (5000, 1)]  # two fresh chunks for cuDNN
    q, k, v, k_cache, v_cache, meta = random_step(step, 16, 2, group, 128, torch.bfloat16, dev, seed=5)
    scale = 128**-0.5
    tiles = TritonPagedBackend()
    want = tiles.forward(q, k, v, k_cache, v_cache, meta, scale)
    chunks_meta = build_inputs(
        [SeqChunk([0] * n, start, meta.block_tables[s].tolist()) for s, (start, n) in enumerate(step)], 16, CPU,
        dense_min_rows=1024,
    ).meta
    assert [s for s, *_ in chunks_meta.dense_seqs] == [0, 3]
    for name in ("slot_mapping", "block_tables", "row_seq", "row_ctx", "last_token_idx", "prefill_tiles",
                 "decode_rows"):  # fmt: skip
        setattr(chunks_meta, name, getattr(chunks_meta, name).to(dev))
    got = tiles.attend(q, k_cache, v_cache, chunks_meta, scale)
    assert max_err(got, want) < TOL[torch.bfloat16]
    prefixed = [(1, 1500, 1100, 3000)]  # a chunk after a cached prefix: the two-call LSE merge
    merged = attend_dense(q, k_cache, v_cache, meta.block_tables, prefixed, scale, torch.zeros_like(q),
                          dense_prefill.cudnn_lse_attention)  # fmt: skip
    assert max_err(merged[1500:2600], want[1500:2600]) < TOL[torch.bfloat16]


@gpu_only
def test_warm_builds_one_plan_per_padded_size():
    assert dense_prefill.warm(32, 8, 128, torch.bfloat16, torch.device("cuda"), 2500) == 3  # 1024, 2048, 3072
