"""The Triton tiled prefill kernel (and the backend that pairs it with the decode kernel) against
SdpaBackend.

On the CPU the kernels run under the Triton interpreter in a child process (see
tests/paged_cases.py for why); on a GPU, `gpu`-marked tests compare the compiled kernels in
bfloat16 at real prompt lengths.
"""

from __future__ import annotations

import pytest
import torch

from aioffload.attention.backends import SdpaBackend, TritonPagedBackend
from aioffload.attention.tiles import PREFILL_TILE, plan_rows
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

pytest.importorskip("triton", reason="triton is not importable; the prefill kernel needs it")


@pytest.fixture
def interpreted():
    """aioffload.attention.prefill_kernel under the interpreter (child process only)."""
    from aioffload.attention import prefill_kernel

    with interpreter():
        yield prefill_kernel


# (start, num_tokens) per sequence, a ragged mixed step: a fresh 70-token prompt (a full tile plus
# 6 rows: not a multiple of the tile), a 37-row chunk after a 100-token cached prefix, a 2-row chunk
# whose first row sits at position 63 (the unmasked key loop ends exactly at a key tile), and two
# decode rows the prefill kernel must leave alone.
STEP = [(0, 70), (100, 37), (12, 1), (63, 2), (5, 1)]
PREFILL_ROWS = [*range(0, 107), 108, 109]
DECODE_ROWS = [107, 110]

# Tiles of 32 rows cut these chunks into full and partial tiles at little interpreter cost; the
# backend test below runs the production tile (PREFILL_TILE).
TEST_TILE = 32
# (group, head_dim, block_size, dtype): GQA ratios 1/4/8, head dims 64/128, blocks 16/32, three dtypes.
CASES = [
    (1, 64, 16, torch.float32),
    (1, 128, 32, torch.bfloat16),
    (4, 64, 32, torch.float16),
    (4, 128, 16, torch.float32),
    (4, 64, 16, torch.bfloat16),
    (8, 64, 16, torch.bfloat16),
    (8, 128, 32, torch.float32),
    (8, 64, 32, torch.float16),
]


def prefill(kernel, q, k_cache, v_cache, meta, scale, tile=TEST_TILE, splits=1):  # type: ignore[no-untyped-def]
    """The prefill kernel on the step's chunks cut into `tile`-row tiles; other rows stay NaN."""
    starts = [sl - ql for ql, sl in zip(meta.query_lens, meta.seq_lens_host)]
    tiles, _ = plan_rows(meta.query_lens, starts, tile)
    out = torch.full_like(q, float("nan"))
    return kernel.prefill_attention(q, k_cache, v_cache, meta.block_tables, torch.tensor(tiles, dtype=torch.int32),
                                    scale, out, block_m=tile, splits=splits)  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("group, head_dim, block_size, dtype", CASES)
def test_interpreted_prefill_matches_sdpa(interpreted, group, head_dim, block_size, dtype):
    num_kv_heads = 1 if group == 8 else 2
    q, k, v, k_cache, v_cache, meta = random_step(STEP, block_size, num_kv_heads, group, head_dim, dtype, CPU)
    assert meta.decode_rows.tolist() == DECODE_ROWS
    scale = head_dim**-0.5
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, scale)
    out = prefill(interpreted, q, k_cache, v_cache, meta, scale)
    assert out.dtype == dtype and TEST_TILE < 70 and 70 % TEST_TILE and 37 % TEST_TILE
    assert out[DECODE_ROWS].isnan().all(), "decode rows belong to the decode kernel"
    err = max_err(out[PREFILL_ROWS], ref[PREFILL_ROWS])
    assert err < TOL[dtype], f"max abs error {err}"
    if dtype != torch.float32:  # rounding, not a wrong key: far below what one misplaced key causes
        assert (out[PREFILL_ROWS].float() - ref[PREFILL_ROWS]).abs().mean().item() < 2e-3


@needs_interpreter
def test_interpreted_prefill_is_causal_per_position(interpreted):
    """Changing the key and value at position 90 of the prefix-cached sequence (positions 100..136)
    changes every one of its rows, and changing those at position 120 changes exactly the rows at
    positions >= 120; no other sequence moves."""
    q, k, v, k_cache, v_cache, meta = random_step(STEP, 16, 2, 4, 64, torch.float32, CPU, seed=1)
    sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    base = prefill(interpreted, q, k_cache, v_cache, meta, 0.125)
    table = meta.block_tables[1]
    for pos, first_changed in ((90, 70), (120, 90)):  # rows 70..106 hold positions 100..136
        kc, vc = k_cache.clone(), v_cache.clone()
        kc[table[pos // 16], pos % 16] += 1.0
        vc[table[pos // 16], pos % 16] -= 1.0
        out = prefill(interpreted, q, kc, vc, meta, 0.125)
        diff = (out - base).abs().amax(dim=(1, 2))  # [T]
        changed = [r for r in PREFILL_ROWS if diff[r] > 1e-6]
        assert changed == list(range(first_changed, 107)), (pos, changed)


@needs_interpreter
def test_interpreted_prefill_with_strided_q(interpreted):
    q, k, v, k_cache, v_cache, meta = random_step(STEP[:2], 16, 2, 4, 64, torch.float32, CPU, 2, q_strided=True)
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    assert max_err(prefill(interpreted, q, k_cache, v_cache, meta, 0.125), ref) < 1e-5


@needs_interpreter
def test_interpreted_backend_mixed_step_matches_sdpa(interpreted):
    """TritonPagedBackend on a mixed step: prefill tiles of PREFILL_TILE rows (a full one and a
    partial one) and decode rows (one long enough for several key tiles) in two launches, after
    writing this step's K/V, equal SdpaBackend."""
    backend = TritonPagedBackend()
    step = [(300, 1), (0, PREFILL_TILE + 3), (37, 30), (5, 1)]
    q, k, v, k_cache, v_cache, meta = random_step(step, 16, 2, 4, 64, torch.float32, CPU, seed=3)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.125)
    ref = SdpaBackend().forward(q, k, v, kc, vc, meta, 0.125)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    assert not out.isnan().any() and max_err(out, ref) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_interpreted_split_keys_match_sdpa(interpreted, splits):
    """Key splits per (head, tile), combined after: the same rows as one walk, including rows that
    see none of a split's keys (past the causal diagonal) and splits with no keys at all (the
    2-row chunk at position 63 has 65 keys: with 5 splits of one 16-key tile, splits 4-... are
    short or empty), and padded empty tiles ([0, 0, 0, 0]) that must write nothing."""
    q, k, v, k_cache, v_cache, meta = random_step(STEP, 16, 2, 4, 64, torch.float32, CPU, seed=6)
    ref = sdpa_reference(q, k, v, k_cache, v_cache, meta, 0.125)
    starts = [sl - ql for ql, sl in zip(meta.query_lens, meta.seq_lens_host)]
    tiles, _ = plan_rows(meta.query_lens, starts, TEST_TILE)
    tiles += [[0, 0, 0, 0]]  # an empty tile, as the chunk graphs pad their grid
    out = torch.full_like(q, float("nan"))
    interpreted.prefill_attention(q, k_cache, v_cache, meta.block_tables, torch.tensor(tiles, dtype=torch.int32),
                                  0.125, out, block_m=TEST_TILE, block_n=16, splits=splits)  # fmt: skip
    assert out[DECODE_ROWS].isnan().all()
    assert max_err(out[PREFILL_ROWS], ref[PREFILL_ROWS]) < 1e-5


def test_split_count_fills_the_machine_and_stays_a_power_of_two():
    from aioffload.attention.prefill_kernel import MAX_SPLITS, num_splits

    assert num_splits(32, 1, 132) == 8  # one tile deep in a prompt: 256 programs over 132 SMs
    assert num_splits(32, 4, 132) == 2
    assert num_splits(32, 16, 132) == 1  # a 2048-row chunk fills the SMs by itself
    assert num_splits(1, 1, 132) == MAX_SPLITS


NUM_INTERPRETED_TESTS = len(CASES) + 3 + 3


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases():
    """Every interpreter test above, in a child pytest started with TRITON_INTERPRET=1."""
    run_interpreter_child(__file__, NUM_INTERPRETED_TESTS)


# ---- the compiled kernels on a GPU ----


@gpu_only
@pytest.mark.parametrize(
    "step",
    [
        pytest.param([(0, 2000)], id="prompt-2000"),
        pytest.param([(0, 8000)], id="prompt-8000"),
        pytest.param([(6000, 2048)], id="chunk-after-6000"),
        pytest.param([(0, 100), (300, 1), (4000, 513), (7, 1), (0, 65)], id="mixed"),
        pytest.param([(8000, 40), (9, 1)], id="small-chunk-deep: key splits"),
    ],
)
@pytest.mark.parametrize("group, head_dim, block_size", [(4, 128, 16), (8, 64, 32), (1, 128, 32)])
def test_cuda_prefill_matches_sdpa_bf16(step, group, head_dim, block_size):
    dev = torch.device("cuda")
    q, k, v, k_cache, v_cache, meta = random_step(step, block_size, 8 // group * 2, group, head_dim,
                                                  torch.bfloat16, dev)  # fmt: skip
    scale = head_dim**-0.5
    kc32, vc32 = k_cache.float(), v_cache.float()
    exact = SdpaBackend().forward(q.float(), k.float(), v.float(), kc32, vc32, meta, scale)
    k_cache.copy_(kc32)
    v_cache.copy_(vc32)
    out = TritonPagedBackend().attend(q, k_cache, v_cache, meta, scale)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert max_err(out, exact) < 2e-2, f"vs float32 SDPA: {max_err(out, exact)}"
    assert (out.float() - exact).abs().mean().item() < 2e-3

