"""Tensor parallelism on the CPU (gloo, 2 ranks): greedy and seeded sampled tokens through
Worker.execute at --tensor-parallel-size 2 equal those of one process, on the demo model and a
tiny random checkpoint of each dense family, resident and offloaded, with one KV head shared by
both ranks and an odd vocabulary, with proposals verified, a draft model and the hybrid split;
and the per-rank figures (KV pool, copy floor) a second rank changes.

This pytest process is rank 0: one spawned follower (the real launcher and command loop) serves
every TP 2 worker of the module, one after another.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from aioffload.attention.kv_cache import BlockManager, BlockPool
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.cli import DEMO_MODEL
from aioffload.config import (
    CacheConfig,
    EngineConfig,
    OffloadConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from aioffload.distributed.launch import spawn_ranks
from aioffload.offload.transfer_queue import TransferQueue
from aioffload.worker.follower import follow
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.tensor_parallel import RunStep
from aioffload.worker.worker import Worker
from tests.tiny_models import ARCHS, make_checkpoint

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=64, temperature=0.9, top_p=0.95, seed=7)
TOKENS = 6


@pytest.fixture(scope="module")
def ranks() -> Iterator[ParallelConfig]:
    """A dead follower fails the next collective at once (gloo sees the closed connection), and here."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the follower inherits it: one thread per rank
    deaths: list[tuple[int, int, int]] = []
    parallel, r = spawn_ranks(ParallelConfig(tensor_parallel_size=2, timeout_s=120), "cpu", follow,
                              on_death=lambda *death: deaths.append(death))  # fmt: skip
    yield parallel
    r.close()
    assert not deaths, f"a rank died during the module: {deaths}"
    assert r.procs[0].exitcode == 0  # it left on the stop command


def make_odd(root: Path) -> Path:
    """Llama, 4 query heads over ONE KV head (both ranks hold it), 255 tokens (the second vocabulary
    shard one row short), tied embeddings."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=255, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(5)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.08)
    model.save_pretrained(root / "odd", safe_serialization=True)
    return root / "odd"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp")
    paths = {arch: str(make_checkpoint(root, arch, seed=11)) for arch in ARCHS}
    paths["odd"] = str(make_odd(root))
    paths["demo"] = DEMO_MODEL
    return paths


def config(model: str, tp: ParallelConfig | None = None, **offload: object) -> EngineConfig:
    return EngineConfig(
        model=model, device="cpu", dtype="float32", cache=CacheConfig(block_size=4, num_blocks=96),
        scheduler=SchedulerConfig(max_model_len=128), offload=OffloadConfig(**offload),  # type: ignore[arg-type]
        parallel=tp or ParallelConfig(),
    ).validate()  # fmt: skip


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(vocab)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 4, 13)]


def generate(w: Worker, seqs: Sequence[Sequence[int]], n: int, params: SamplingParams = GREEDY,
             num_draft: int = 0) -> list[list[int]]:  # fmt: skip
    """n tokens per prompt through Worker.execute: one prefill step, then batched decode steps."""
    bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
    seqs = [list(s) for s in seqs]
    out: list[list[int]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    while min(len(o) for o in out) < n:
        chunks = []
        for i, s in enumerate(seqs):
            assert bm.allocate_slots(i, len(s) + num_draft + 1)
            chunks.append(SeqChunk(s[done[i] :], done[i], bm.block_table(i)))
        steps = [len(o) for o in out]
        res = w.execute(chunks, [params] * len(seqs), [100 + i for i in range(len(seqs))], steps,
                        [num_draft] * len(seqs) if num_draft else None)  # fmt: skip
        for i, toks in enumerate(res.token_ids):
            done[i] = len(seqs[i])
            seqs[i] += toks
            out[i] += toks
    return [o[:n] for o in out]


def prefill_logits(w: Worker) -> torch.Tensor:
    """[S, V] last-token logits of the prompts (Worker._step: the forward on every rank, then rank 0's gather)."""
    bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
    seqs = prompts(w.model_config.vocab_size)
    chunks = []
    for i, s in enumerate(seqs):
        assert bm.allocate_slots(i, len(s))
        chunks.append(SeqChunk(s, 0, bm.block_table(i)))
    return w._step(chunks, None, argmax=False)


def both(model: str, ranks: ParallelConfig, params: SamplingParams = GREEDY, **offload: object) -> tuple:
    one = Worker(config(model, **offload), Checkpoint.open(model))
    a = generate(one, prompts(one.model_config.vocab_size), TOKENS, params)
    two = Worker(config(model, ranks, **offload), Checkpoint.open(model))
    b = generate(two, prompts(two.model_config.vocab_size), TOKENS, params)
    return one, two, a, b


@pytest.mark.parametrize("name", ["demo", *ARCHS, "odd"])
def test_greedy_tokens_equal_one_process_resident(name: str, checkpoints: dict[str, str], ranks: ParallelConfig):
    one, two, a, b = both(checkpoints[name], ranks)
    assert two.tp is not None and two.tp.leader and one.tp is None
    assert not one.offload_active and not two.offload_active
    assert a == b, f"{name}: TP 1 {a} != TP 2 {b}"
    la, lb = prefill_logits(one), prefill_logits(two)  # the gathered vocabulary shards: every column
    assert la.shape == lb.shape == (3, one.model_config.vocab_size)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["demo", *ARCHS, "odd"])
def test_greedy_tokens_equal_one_process_offloaded(name: str, checkpoints: dict[str, str], ranks: ParallelConfig):
    ckpt = Checkpoint.open(checkpoints[name])
    layer = ckpt.layout.nbytes(torch.float32)
    one, two, a, b = both(checkpoints[name], ranks, cpu_offload_gb=1.5 * layer / 1e9)  # 2 layers, all ranks together
    assert len(one.placement.offloaded_layers) == len(two.placement.offloaded_layers) == 2
    assert one.offload_active and two.offload_active
    assert a == b, f"{name}: TP 1 {a} != TP 2 {b}"


@pytest.mark.parametrize("name", ["demo", "odd"])
def test_seeded_sampled_tokens_equal_one_process(name: str, checkpoints: dict[str, str], ranks: ParallelConfig):
    """Sampling on rank 0 from the gathered logits (the vocabulary shards reassembled)."""
    _, _, a, b = both(checkpoints[name], ranks, SAMPLED)
    greedy = both(checkpoints[name], ranks)[2]
    assert a == b and a != greedy


def test_the_kv_pool_grows_and_the_copy_floor_shrinks_with_the_ranks(ranks: ParallelConfig):
    """Demo: 4 KV heads, 2 per rank: the same --cpu-kv-cache-gb holds twice the blocks; the same
    --cpu-offload-gb (all ranks together) streams half the bytes per rank."""
    layer = Checkpoint.open(DEMO_MODEL).layout.nbytes(torch.float32)
    base = dataclasses.replace(config(DEMO_MODEL, cpu_offload_gb=1.5 * layer / 1e9), cache=CacheConfig(block_size=4))
    one = Worker(base, Checkpoint.open(DEMO_MODEL))
    two = Worker(base.replace(parallel=ranks), Checkpoint.open(DEMO_MODEL))
    assert two._block_bytes(4) * 2 == one._block_bytes(4) == 2 * 4 * 4 * 4 * 32 * 4  # K,V layers tokens heads D fp32
    assert (one.num_blocks, two.num_blocks) == (int(0.25e9 // 16384), int(0.25e9 // 8192)) == (15258, 30517)
    assert two.shard_config.num_kv_heads == 2 and two.shard_config.num_heads == 4
    assert two.placement.offloaded_layers == one.placement.offloaded_layers == (2, 3)
    assert two.copy_floor_s == pytest.approx(one.copy_floor_s / 2, rel=2e-3)  # replicated norms: a hair over half
    assert two.copy_floor_s > one.copy_floor_s / 2


def test_proposals_verified_on_rank_zero_equal_one_process(checkpoints: dict[str, str], ranks: ParallelConfig):
    """A chunk ending in proposals (prompt lookup's kind): the target's own continuation is accepted
    whole, a wrong token ends it, the same way at TP 1 and TP 2."""
    path = checkpoints["qwen2"]
    seq = prompts(256)[0]
    outs = []
    for tp in (None, ranks):
        w = Worker(config(path, tp), Checkpoint.open(path))
        cont = generate(w, [seq], 4)[0]
        bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
        assert bm.allocate_slots(0, len(seq) + 4) and bm.allocate_slots(1, len(seq) + 4)
        proposals = [cont[:3], [cont[0], (cont[1] + 1) % 256, cont[2]]]
        chunks = [SeqChunk([*seq, *p], 0, bm.block_table(i), num_logits=4) for i, p in enumerate(proposals)]
        outs.append((cont, w.execute(chunks, [GREEDY] * 2, [0, 1], [0, 0]).token_ids))
    (cont, one), (_, two) = outs
    assert one == two == [cont[:4], cont[:2]]


def test_draft_model_on_rank_zero_keeps_the_greedy_tokens(checkpoints: dict[str, str], ranks: ParallelConfig):
    path = checkpoints["llama"]
    plain = generate(Worker(config(path), Checkpoint.open(path)), prompts(256), TOKENS)
    spec = config(path, ranks).replace(speculative=SpeculativeConfig(method="draft", draft_model=path, num_tokens=3))
    w = Worker(spec, Checkpoint.open(path))
    assert w.draft is not None
    assert generate(w, prompts(256), TOKENS, num_draft=3) == plain


class FixedShare:
    """A SplitChooser stand-in: the host computes `k` chunks at every step size (CPU timings would decide
    otherwise, and the tiny layers leave the host nothing to gain)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, tokens: int) -> int:
        return self.k

    def observe_step(self, shares: object) -> None:
        pass


def test_hybrid_split_per_rank_keeps_the_greedy_tokens(ranks: ParallelConfig):
    """--hybrid on: rank 0 picks the host share; each rank's host computes that many chunks of its own
    MLP shard of every offloaded layer, its GPU side the rest."""
    layer = Checkpoint.open(DEMO_MODEL).layout.nbytes(torch.float32)
    cfg = config(DEMO_MODEL, cpu_offload_gb=1.5 * layer / 1e9, hybrid="on", host_threads=1)
    plain = generate(Worker(config(DEMO_MODEL), Checkpoint.open(DEMO_MODEL)), prompts(4096), TOKENS)
    two = Worker(cfg.replace(parallel=ranks), Checkpoint.open(DEMO_MODEL))
    assert two.hybrid is not None and len(two.placement.offloaded_layers) == 2
    assert (two.hybrid.split.intermediate, two.hybrid.split.num_chunks) == (384, 3)  # 768 MLP units, 384 a rank
    two.hybrid.chooser = FixedShare(2)  # type: ignore[assignment]
    assert generate(two, prompts(4096), TOKENS) == plain
    assert two.hybrid.last_share == pytest.approx(2 / 3)


def test_a_followers_step_applies_rank_zeros_host_share():
    """Worker.follow, the step every rank but 0 runs, sets the split rank 0 chose before its forward."""
    layer = Checkpoint.open(DEMO_MODEL).layout.nbytes(torch.float32)
    w = Worker(config(DEMO_MODEL, cpu_offload_gb=1.5 * layer / 1e9, hybrid="on", host_threads=1),
               Checkpoint.open(DEMO_MODEL))  # fmt: skip
    bm = BlockManager(BlockPool(w.num_blocks, w.block_size))
    assert bm.allocate_slots(0, 5) and isinstance(w.layers, TransferQueue)
    w.follow(RunStep((SeqChunk([5, 6, 7, 8, 9], 0, bm.block_table(0)),), argmax=True, host_share=4))
    assert (w.layers.step_k, w.layers.load_k) == (4, 4)
