"""MoE on CUDA: streamed experts (copy stream, events, pinned counts) bit-identical to resident in bf16,
torch._grouped_mm in use, and CUDA graphs for an all-resident MoE model equal to eager.

Marked `gpu` and skipped without CUDA; run on the GPU machine with `pytest -m gpu tests/test_moe_gpu.py`.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from aioffload.attention.backends import select_backend
from aioffload.attention.kv_cache import BlockManager, BlockPool, KVCache
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
from aioffload.engine.async_engine import Engine
from aioffload.model.layout import expert_layout
from aioffload.model.moe import grouped_mm_works
from aioffload.offload.expert_layers import MoeLayers
from aioffload.offload.expert_placement import ExpertPlan
from aioffload.offload.expert_stream import ExpertStream
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.model_loader import build_model
from aioffload.worker.sampling import SamplingParams
from tests.tiny_models import add_word_tokenizer, make_moe_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("moe_gpu")
    return str(add_word_tokenizer(make_moe_checkpoint(root, "qwen3_moe-e7-top2-norm", seed=3)))


def logits(path: str, plan: ExpertPlan | None) -> tuple[torch.Tensor, MoeLayers]:
    """Prefill three sequences, then four decode steps in one batch; all last-token logits (bf16 model)."""
    ckpt = Checkpoint.open(path)
    cfg = ckpt.model_config
    model, layers = build_model(ckpt, torch.bfloat16, CUDA, select_backend("auto", CUDA), 512, experts=plan)
    assert isinstance(layers, MoeLayers)
    bm = BlockManager(BlockPool(64, 16))
    kv = KVCache(cfg.num_layers, 64, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, CUDA)
    seqs = [[1, 5, 9, 33, 7, 100, 3] * 5, [1, 200, 201, 17], [1, 42] * 20]
    for i, s in enumerate(seqs):
        bm.allocate_slots(i, len(s))
    inp = build_inputs([SeqChunk(s, 0, bm.block_table(i)) for i, s in enumerate(seqs)], 16, CUDA)
    outs = [model.forward(inp.input_ids, inp.positions, inp.meta, kv)]
    for _ in range(4):
        chunks = []
        for i, s in enumerate(seqs):
            s.append(int(outs[-1][i].argmax()))
            bm.allocate_slots(i, len(s))
            chunks.append(SeqChunk([s[-1]], len(s) - 1, bm.block_table(i)))
        inp = build_inputs(chunks, 16, CUDA)
        outs.append(model.forward(inp.input_ids, inp.positions, inp.meta, kv))
    return torch.cat(outs).float().cpu(), layers


def plan(path: str, resident: dict[int, int], mode: str, cache: int, h2d: float) -> ExpertPlan:
    cfg = Checkpoint.open(path).model_config
    return ExpertPlan(
        num_experts=cfg.num_experts, expert_bytes=expert_layout(cfg).numel * 2,
        resident=tuple((layer, resident.get(layer, cfg.num_experts)) for layer in cfg.moe_layers),
        staging_slots=2, cache_experts=cache, stream_mode=mode, h2d_bytes_per_s=h2d,
    )  # fmt: skip


def test_grouped_mm_runs_on_this_gpu(moe: str) -> None:
    cfg = Checkpoint.open(moe).model_config
    assert grouped_mm_works(CUDA, torch.bfloat16, expert_layout(cfg))


@pytest.mark.parametrize(
    "resident, mode, cache, h2d",
    [
        ({0: 7, 1: 3, 2: 0, 3: 0}, "routed", 0, 50e9),
        ({0: 7, 1: 3, 2: 0, 3: 0}, "full", 0, 50e9),
        ({0: 0, 1: 0, 2: 0, 3: 0}, "routed", 5, 50e9),
        ({0: 0, 1: 2, 2: 0, 3: 0}, "auto", 4, 1e6),  # slow link: routed for decode, whole sets for prefill
    ],
)
def test_streamed_experts_bit_identical_on_cuda(moe: str, resident: dict[int, int], mode: str, cache: int, h2d: float):
    ref, _ = logits(moe, None)
    ours, layers = logits(moe, plan(moe, resident, mode, cache, h2d))
    stream = layers.experts
    assert isinstance(stream, ExpertStream) and stream.cuda
    assert torch.equal(ours, ref), f"max abs diff {(ours - ref).abs().max().item()}"
    stream.end_step()
    t = stream.total
    assert (t.routed_layers > 0) == (mode != "full") and (t.full_layers > 0) == (mode != "routed")


def test_all_resident_moe_captures_cuda_graphs_and_equals_eager(moe: str) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(eager: bool) -> tuple[list[list[int]], bool]:
        cfg = EngineConfig(
            model=moe, dtype="bfloat16", enforce_eager=eager, cache=CacheConfig(num_blocks=256, block_size=16),
            scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=8), offload=OffloadConfig(),
        ).validate()  # fmt: skip
        engine = Engine.from_config(cfg)

        async def main() -> list[list[int]]:
            async def one(i: int) -> list[int]:
                ids: list[int] = []
                async for out in engine.generate([1, 5 + i, 9, 33], params, f"r{i}"):
                    ids.extend(out.token_ids)
                return ids

            try:
                return list(await asyncio.gather(*(one(i) for i in range(4))))
            finally:
                await engine.shutdown(1.0)

        return asyncio.run(main()), engine.worker.graphs is not None

    graphs_out, graphs_on = run(eager=False)
    eager_out, eager_graphs = run(eager=True)
    assert graphs_on and not eager_graphs
    assert graphs_out == eager_out
