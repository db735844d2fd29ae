"""The eager worker's start-up mixed steps (worker/mixed_warmup.py): the chunks they run, and on the
GPU that a mixed step after start-up compiles no new Triton kernel variant."""

from __future__ import annotations

import pytest
import torch

from aioffload.worker.mixed_warmup import DECODE_CONTEXT_BLOCKS, warmup_steps


def test_warmup_steps_two_decode_rows_beside_a_long_chunk_then_many_beside_a_short_one() -> None:
    a, b = warmup_steps(max_seqs=64, token_budget=4096, long_rows=1024, block_size=16, num_blocks=1000)
    assert [len(c.token_ids) for c in a] == [1, 1, 1024] and [len(c.token_ids) for c in b] == [1] * 63 + [32]
    for step in (a, b):
        *decodes, chunk = step
        assert all(c.start == DECODE_CONTEXT_BLOCKS * 16 - 1 and len(c.block_table) == 2 for c in decodes)
        assert chunk.start == 0 and len(chunk.block_table) * 16 >= len(chunk.token_ids)
        blocks = [b for c in step for b in c.block_table]
        assert len(blocks) == len(set(blocks)) and max(blocks) < 1000  # one owner per block, inside the pool
    assert a[-1].block_table == list(range(4, 4 + 64))


def test_warmup_steps_fit_the_budget_the_seats_and_the_pool() -> None:
    (a, b) = warmup_steps(max_seqs=8, token_budget=100, long_rows=1024, block_size=16, num_blocks=1000)
    assert [len(c.token_ids) for c in a] == [1, 1, 98]  # the long chunk cut to the budget
    assert len(b) == 8 and len(b[-1].token_ids) == 32  # 7 decode rows: one seat stays for the prompt
    assert warmup_steps(max_seqs=1, token_budget=100, long_rows=64, block_size=16, num_blocks=1000) == []
    # 2 rows x 2 blocks + 64 blocks of the long chunk do not fit in 40 blocks; 8 x 2 + 2 do
    only = warmup_steps(max_seqs=9, token_budget=2048, long_rows=1024, block_size=16, num_blocks=40)
    assert [len(s) for s in only] == [9]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_a_mixed_step_after_start_up_compiles_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    from triton import knobs

    from aioffload.checkpoint.checkpoint import Checkpoint
    from aioffload.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
    from aioffload.model.layout import layer_layout
    from aioffload.worker.inputs import SeqChunk
    from aioffload.worker.worker import Worker
    from tests.tiny_models import make_checkpoint

    path = str(make_checkpoint(tmp_path_factory.mktemp("warm"), "llama", seed=3, layers=4))
    ckpt = Checkpoint.open(path)
    half = 2 * layer_layout(ckpt.model_config).nbytes(torch.float32) / 1e9
    cfg = EngineConfig(
        model=path, dtype="float32", device="cuda", cache=CacheConfig(num_blocks=256, block_size=16),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256),
        offload=OffloadConfig(cpu_offload_gb=half, hybrid="off"),
    ).validate()  # fmt: skip
    forget_compiled_kernels()  # earlier tests in this process compiled some of them: the hook would not see them
    compiled: list[str] = []
    old = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["repr"].split("[")[0])
    try:
        worker = Worker(cfg, ckpt)
        assert worker.graphs is None and worker.offload_active
        at_start = len(compiled)
        assert "_paged_attn_kernel" in compiled  # the warm-up's mixed steps compiled the row-subset variant
        # the shape that stalled: decode rows at various depths beside a prompt chunk
        chunks = [SeqChunk([5], 20 + 5 * i, [100 + 2 * i, 101 + 2 * i]) for i in range(3)]
        chunks.append(SeqChunk(list(range(3, 43)), 0, [200, 201, 202]))
        worker._forward(chunks)
        torch.cuda.synchronize()
        assert compiled[at_start:] == []
    finally:
        knobs.runtime.jit_post_compile_hook = old


def forget_compiled_kernels() -> None:
    """Empty the in-process caches of every Triton kernel in the package, so each is compiled (or
    loaded from Triton's disk cache, which also calls the post-compile hook) on its next launch."""
    import sys

    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if name.startswith("aioffload.") and module is not None:
            for value in vars(module).values():
                # a JITFunction's own .fn is the Python function; an autotuner's or heuristics' .fn the kernel
                fn = value if isinstance(value, JITFunction) else getattr(value, "fn", None)
                if isinstance(fn, JITFunction):
                    fn.device_caches.clear()
