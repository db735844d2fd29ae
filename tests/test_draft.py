"""The draft model (worker/draft.py) inside Worker.execute: its KV cache stays in step with the target's
over the same block ids (rollback and full acceptance included), and its proposals are its own greedy
continuation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aioffload.attention.kv_cache import BlockManager, BlockPool, KVCache, slot_mapping
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker

DEMO = DEMO_MODEL
GREEDY = SamplingParams(temperature=0.0)


def worker(draft: str | None) -> Worker:
    cfg = EngineConfig(
        model=DEMO, device="cpu", cache=CacheConfig(num_blocks=64, block_size=4),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=128, max_num_seqs=8),
        speculative=SpeculativeConfig(method="draft" if draft else "off", draft_model=draft),
    ).validate()  # fmt: skip
    return Worker(cfg, Checkpoint.open(DEMO))


def decode(w: Worker, prompt: list[int], steps: int, k: int) -> tuple[list[int], list[int], BlockManager]:
    """Prefill, then `steps` steps with k draft proposals each, rolling back as the engine does.
    Returns (prompt + outputs, tokens emitted per step, the block manager)."""
    bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
    assert bm.allocate_slots(0, len(prompt))
    seq = list(prompt)
    seq += w.execute([SeqChunk(prompt, 0, bm.block_table(0))], [GREEDY], [0], [0]).token_ids[0]
    per_step = []
    for _ in range(steps):
        computed = len(seq) - 1
        assert bm.allocate_slots(0, len(seq) + k)
        out = w.execute([SeqChunk([seq[-1]], computed, bm.block_table(0))], [GREEDY], [0], [len(seq) - len(prompt)],
                        num_draft=[k]).token_ids[0]  # fmt: skip
        seq += out
        per_step.append(len(out))
        bm.truncate(0, len(seq) - 1)
    return seq, per_step, bm


def assert_draft_kv_is_a_fresh_prefill(w: Worker, seq: list[int], bm: BlockManager) -> None:
    """The draft's K/V at every computed position equal running the draft over those tokens at once."""
    draft = w.draft
    assert draft is not None and draft.kv is not None
    computed = len(seq) - 1
    table = bm.block_table(0)
    ref = KVCache(draft.config.num_layers, w.num_blocks, w.block_size, draft.config.num_kv_heads,
                  draft.config.head_dim, draft.dtype, w.device)  # fmt: skip
    inp = build_inputs([SeqChunk(seq[:computed], 0, table)], w.block_size, w.device)
    draft.model.forward(inp.input_ids, inp.positions, inp.meta, ref)
    slots = torch.tensor(slot_mapping(table, 0, computed, w.block_size))
    for layer in range(draft.config.num_layers):
        for got, want in ((draft.kv.k[layer], ref.k[layer]), (draft.kv.v[layer], ref.v[layer])):
            assert torch.allclose(got.flatten(0, 1)[slots], want.flatten(0, 1)[slots], atol=1e-5), layer


def test_identical_draft_is_accepted_whole_and_its_kv_matches_a_fresh_prefill() -> None:
    w = worker(DEMO)
    prompt = [int(t) for t in torch.randint(2, 4000, (17,), generator=torch.Generator().manual_seed(3))]
    seq, per_step, bm = decode(w, prompt, steps=6, k=4)
    assert per_step == [5] * 6  # every proposal accepted, plus the bonus
    plain = worker(None)
    want, _, _ = decode(plain, prompt, steps=30, k=0)
    assert seq == want[: len(seq)]  # the target's own greedy continuation

    # The draft's KV holds every position the target's does (the last proposal's included, written
    # after full acceptance).
    assert_draft_kv_is_a_fresh_prefill(w, seq, bm)


def test_proposals_are_the_drafts_greedy_continuation_and_rollback_keeps_kv_valid(tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "perturbed"
    shutil.copytree(DEMO, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"] *= 2.0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    w = worker(str(path))
    prompt = [int(t) for t in torch.randint(2, 4000, (9,), generator=torch.Generator().manual_seed(5))]
    seq, per_step, bm = decode(w, prompt, steps=12, k=3)
    assert_draft_kv_is_a_fresh_prefill(w, seq, bm)  # after rollbacks too
    assert min(per_step) >= 1 and max(per_step) <= 4 and any(n < 4 for n in per_step) and any(n > 1 for n in per_step)
    want, _, _ = decode(worker(None), prompt, steps=60, k=0)
    assert seq == want[: len(seq)]
    # Proposals straight from the draft: its own greedy continuation of the sequence.
    assert w.draft is not None
    draft_alone = worker(None)
    draft_alone.model = w.draft.model  # the plain path of a worker, over the draft's weights
    bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
    assert bm.allocate_slots(0, len(seq) + 3)
    chunks = [SeqChunk(seq, 0, bm.block_table(0))]
    prop = w.draft.propose(chunks, [3], [GREEDY], [0], [0])
    d_seq, _, _ = decode(draft_alone, seq, steps=2, k=0)
    assert prop.token_ids == [d_seq[len(seq) : len(seq) + 3]] and prop.probs is None and prop.full == [False]


def test_sampled_proposals_seeded_share_the_targets_noise_unseeded_carry_q() -> None:
    from aioffload.worker.sampling import SamplingTensors, sample

    w = worker(DEMO)
    assert w.draft is not None
    prompt = [int(t) for t in torch.randint(2, 4000, (12,), generator=torch.Generator().manual_seed(8))]
    bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
    assert bm.allocate_slots(0, len(prompt) + 1) and bm.allocate_slots(1, len(prompt) + 1)
    seeded, unseeded = SamplingParams(temperature=0.9, seed=5), SamplingParams(temperature=0.9)
    chunks = [SeqChunk(prompt, 0, bm.block_table(0)), SeqChunk(prompt, 0, bm.block_table(1))]
    prop = w.draft.propose(chunks, [1, 1], [seeded, unseeded], [5, 5], [3, 3])
    assert prop.full == [False, True] and prop.probs is not None
    # Seeded: the draft's draw with the target's noise at output index 3 (seed 5, step 3).
    logits = w.draft._forward([SeqChunk(prompt, 0, bm.block_table(0))])
    want = sample(logits, SamplingTensors.build([seeded], [5], [3], w.device)).item()
    assert prop.token_ids[0] == [want]
    # Unseeded: an independent draw, with its distribution q kept for the rejection sampler.
    q = prop.probs[1]
    assert q.sum().item() == pytest.approx(1.0, abs=1e-5) and q[prop.token_ids[1][0]] > 0
    assert prop.probs[0].abs().sum() == 0  # one-hot proposals carry no q
