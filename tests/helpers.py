"""Shared test helpers: build our model from a tiny checkpoint and drive it step by step on the CPU."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from aioffload.attention.backends import AttentionBackend, SdpaBackend
from aioffload.attention.kv_cache import BlockManager, BlockPool, KVCache
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.model.llama import LayerSource, LlamaModel
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.model_loader import build_model

CPU = torch.device("cpu")


def wait_for(cond: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Poll `cond` until it is truthy (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
BLOCK_SIZE = 4
NUM_BLOCKS = 64


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run ~10x faster on one intra-op thread (no spinning
    workers fighting other processes). Restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build(
    path: Path,
    offloaded: frozenset[int] = frozenset(),
    ring: int = 2,
    dtype: torch.dtype = torch.float32,
    attention: AttentionBackend | None = None,
) -> tuple[LlamaModel, LayerSource]:
    ckpt = Checkpoint.open(path)
    return build_model(ckpt, dtype, CPU, attention or SdpaBackend(), 512, offloaded=offloaded, ring_size=ring)


class Runner:
    """Drives `model` over a fixed set of prompts: prefill (optionally chunked), then greedy decode.
    Keeps its own block manager and KV cache, so a step can be retried after a failure."""

    def __init__(self, model: LlamaModel, prompts: Sequence[Sequence[int]]) -> None:
        cfg = model.cfg
        self.model = model
        self.bm = BlockManager(BlockPool(NUM_BLOCKS, BLOCK_SIZE))
        shape = (cfg.num_layers, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
        self.kv = KVCache(*shape, model.dtype, CPU)
        self.seqs = [list(p) for p in prompts]
        self.done = [0] * len(self.seqs)

    def _forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        inp = build_inputs(chunks, BLOCK_SIZE, CPU)
        return self.model.forward(inp.input_ids, inp.positions, inp.meta, self.kv)

    def prefill_step(self, chunk: int | None = None) -> tuple[torch.Tensor, list[tuple[int, bool]]]:
        """One step over every unfinished prompt; returns logits [S, V] and (seq, finished) per row.
        Progress is committed only when the forward pass returns."""
        chunks, rows = [], []
        for i, s in enumerate(self.seqs):
            if self.done[i] < len(s):
                start = self.done[i]
                n = len(s) - start if chunk is None else min(chunk, len(s) - start)
                assert self.bm.allocate_slots(i, start + n)
                chunks.append(SeqChunk(s[start : start + n], start, self.bm.block_table(i)))
                rows.append((i, n))
        logits = self._forward(chunks)
        out = []
        for i, n in rows:
            self.done[i] += n
            out.append((i, self.done[i] == len(self.seqs[i])))
        return logits, out

    def prefill(self, chunk: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (last-token logits of each prompt [S, V], logits of every step)."""
        last: list[Any] = [None] * len(self.seqs)
        steps = []
        while any(d < len(s) for d, s in zip(self.done, self.seqs, strict=True)):
            logits, rows = self.prefill_step(chunk)
            steps.append(logits)
            for row, (i, finished) in enumerate(rows):
                if finished:
                    last[i] = logits[row]
        return torch.stack(last), steps

    def decode_step(self, next_ids: Sequence[int]) -> torch.Tensor:
        chunks = []
        for i, s in enumerate(self.seqs):
            s.append(int(next_ids[i]))
            self.done[i] = len(s)
            assert self.bm.allocate_slots(i, len(s))
            chunks.append(SeqChunk([s[-1]], len(s) - 1, self.bm.block_table(i)))
        return self._forward(chunks)

    def generate(
        self, decode_steps: int, chunk: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[list[int]]]:
        """(prefill logits [S, V], decode logits per step, greedy ids per sequence)."""
        pre, _ = self.prefill(chunk)
        nxt = pre.argmax(-1).tolist()
        gen: list[list[int]] = [[] for _ in self.seqs]
        dec = []
        for _ in range(decode_steps):
            for i, t in enumerate(nxt):
                gen[i].append(t)
            logits = self.decode_step(nxt)
            dec.append(logits)
            nxt = logits.argmax(-1).tolist()
        return pre, dec, gen


def write_random_checkpoint(root: Path, layers: int = 4, seed: int = 0, qk_norm: bool = True) -> Path:
    """A tiny Qwen3-shaped (or Llama-shaped, qk_norm=False) checkpoint written directly with safetensors:
    no transformers import, so it takes milliseconds. Same tensor names and shapes as save_pretrained."""
    from safetensors.torch import save_file

    vocab, hidden, inter, heads, kv_heads, head_dim = 256, 64, 128, 4, 2, 32
    config = dict(
        architectures=["Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"], vocab_size=vocab,
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False, dtype="float32", bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * 0.08

    def norm(n: int) -> torch.Tensor:  # away from 1 so the norms matter
        return torch.rand(n, generator=g) + 0.5

    tensors = {"model.embed_tokens.weight": matrix(vocab, hidden), "model.norm.weight": norm(hidden)}
    tensors["lm_head.weight"] = matrix(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            f"{p}input_layernorm.weight": norm(hidden),
            f"{p}self_attn.q_proj.weight": matrix(heads * head_dim, hidden),
            f"{p}self_attn.k_proj.weight": matrix(kv_heads * head_dim, hidden),
            f"{p}self_attn.v_proj.weight": matrix(kv_heads * head_dim, hidden),
            f"{p}self_attn.o_proj.weight": matrix(hidden, heads * head_dim),
            f"{p}post_attention_layernorm.weight": norm(hidden),
            f"{p}mlp.gate_proj.weight": matrix(inter, hidden),
            f"{p}mlp.up_proj.weight": matrix(inter, hidden),
            f"{p}mlp.down_proj.weight": matrix(hidden, inter),
        }
        if qk_norm:
            tensors[f"{p}self_attn.q_norm.weight"] = norm(head_dim)
            tensors[f"{p}self_attn.k_norm.weight"] = norm(head_dim)
    path = root / f"raw-{'qwen3' if qk_norm else 'llama'}-{layers}-{seed}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def save_sharded(src: Path, dst: Path, max_shard_size: str = "200KB") -> Path:
    """Re-save checkpoint `src` with Hugging Face's sharding (writes model.safetensors.index.json)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    return dst


class FailOnce(SdpaBackend):
    """SDPA that raises once, on the `fail_at`-th attention call (= decoder layer of a forward)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_at: int | None = None

    def attend(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.fail_at is not None and self.calls == self.fail_at:
            self.fail_at = None
            raise RuntimeError("injected failure")
        self.calls += 1
        return super().attend(*args, **kwargs)

    def arm(self, layer: int) -> None:
        self.calls, self.fail_at = 0, layer


def make_cpu_engine(model: str, *, num_blocks: int = 256, budget: int = 64, seqs: int = 16, spec: str = "off"):  # type: ignore[no-untyped-def]
    """A CPU engine over `model` with a small fixed pool (blocks of 4) and max-model-len 128; with
    `spec`, up to 6 proposals a step, k chosen by acceptance alone (a draft here costs nothing)."""
    from aioffload.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
    from aioffload.engine.async_engine import Engine

    cfg = EngineConfig(
        model=model, device="cpu",
        cache=CacheConfig(num_blocks=num_blocks, block_size=4),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=budget, max_num_seqs=seqs),
        speculative=SpeculativeConfig(method=spec, num_tokens=6),
    ).validate()  # fmt: skip
    engine = Engine.from_config(cfg)
    if engine.speculation is not None:
        engine.speculation.draft_step_s = 0.0
    return engine


def run_jobs(engine, jobs):  # type: ignore[no-untyped-def]
    """Every (prompt, SamplingParams) of `jobs` at once (request ids r0, r1, ...), each request's
    outputs in order; every KV block must be free again after. The engine keeps running."""
    import asyncio

    async def one(i, prompt, p):  # type: ignore[no-untyped-def]
        return [o async for o in engine.generate(prompt, p, f"r{i}")]

    async def main():  # type: ignore[no-untyped-def]
        return list(await asyncio.gather(*(one(i, pr, p) for i, (pr, p) in enumerate(jobs))))

    outs = asyncio.run(main())
    assert engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks
    return outs
