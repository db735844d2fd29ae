"""The draft model: a small checkpoint, always resident, proposing k tokens per sequence per step.

Its KV cache is its own tensors over the target's block ids: the draft reads and writes the same
slots the target's block tables name, so allocation, preemption, rollback and freeing all follow the
target's block manager and nothing here tracks requests.

Invariant, at the start of every step: the draft's KV holds every position the target's does. Each
step the draft first runs every chunk's known tokens (prefill chunks too), then proposes
autoregressively; after verification, a sequence that accepted all k proposals gets one more draft
forward for the last proposal, whose K/V the target now keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from aioffload.attention.backends import AttentionBackend
from aioffload.attention.kv_cache import KVCache, kv_bytes_per_block
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.config import ConfigError, ModelConfig
from aioffload.model.llama import LlamaModel
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.model_loader import build_model
from aioffload.worker.sampling import SamplingParams, SamplingTensors, probs, sample

log = logging.getLogger("aioffload.draft")

DRAFT_SEED_SALT = 0x5DEECE66D  # unseeded requests: the draft's noise, independent of the target's


def check_same_vocabulary(target: Path, target_cfg: ModelConfig, draft: Path, draft_cfg: ModelConfig) -> None:
    """Raise ConfigError (one line) unless the draft's vocabulary is the target's: the same logits
    width and, where both folders have one, the same tokenizer.json vocabulary."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ConfigError(
            f"--draft-model {draft}: vocabulary of {draft_cfg.vocab_size} tokens, the target's has "
            f"{target_cfg.vocab_size}: a draft must share the target's tokenizer"
        )
    files = (target / "tokenizer.json", draft / "tokenizer.json")
    if all(f.is_file() for f in files):
        from tokenizers import Tokenizer

        t, d = (Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True) for f in files)
        if t != d:
            differ = sum(1 for tok, i in d.items() if t.get(tok) != i) + abs(len(t) - len(d))
            raise ConfigError(
                f"--draft-model {draft}: its tokenizer.json maps {differ} tokens differently from the target's: "
                "a draft must share the target's tokenizer"
            )


@dataclass
class Proposals:
    token_ids: list[list[int]]  # per chunk, num_draft[i] proposed tokens
    probs: torch.Tensor | None  # [P, V] q of each proposal (sequence-major) where `full`; None if none is
    full: list[bool]  # per chunk: its proposals were drawn from q with noise of their own (verify by p/q)


class DraftModel:
    """A resident model over the target's block tables (see the module docstring)."""

    def __init__(
        self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, attention: AttentionBackend,
        max_positions: int, block_size: int,
    ) -> None:  # fmt: skip
        t = time.perf_counter()
        self.model: LlamaModel = build_model(ckpt, dtype, device, attention, max_positions)[0]
        self.config = ckpt.model_config
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.kv: KVCache | None = None
        self.step_s = 0.0  # one batch-1 draft forward, measured in allocate_kv
        log.info("draft model %s: %d layers, loaded in %.1f s", ckpt.path.name, self.config.num_layers,
                 time.perf_counter() - t)  # fmt: skip

    def kv_bytes_per_block(self) -> int:
        c = self.config
        return kv_bytes_per_block(c.num_layers, self.block_size, c.num_kv_heads, c.head_dim, self.dtype.itemsize)

    def allocate_kv(self, num_blocks: int) -> None:
        """KV tensors for the target's `num_blocks` block ids; then time one decode-shaped forward."""
        c = self.config
        self.kv = KVCache(c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim, self.dtype,
                          self.device)  # fmt: skip
        probe = [SeqChunk([0], 0, [0])]
        times = []
        for _ in range(4):  # a warm-up, then the fastest of three
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            self._forward(probe)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t)
        self.step_s = min(times[1:])
        log.info("draft KV cache: %d blocks; a draft step takes %.2f ms", num_blocks, self.step_s * 1e3)

    def _forward(self, chunks: Sequence[SeqChunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        assert self.kv is not None, "allocate_kv first"
        inp = build_inputs(chunks, self.block_size, self.device)
        ids = inp.input_ids if input_ids is None else input_ids
        return self.model.forward(ids, inp.positions, inp.meta, self.kv)  # [S, V]

    def propose(
        self,
        chunks: Sequence[SeqChunk],
        num_draft: Sequence[int],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
    ) -> Proposals:
        """Run every chunk's known tokens, then propose num_draft[i] tokens after chunk i.

        Greedy requests get the draft's argmax. Sampled requests with a seed get the draft's
        Gumbel-max draw with the target's own noise for that output index: verified as one-hot
        proposals, the tokens stay the plain sampler's, so a seed gives the same text whatever k
        the scheduler picked (acceptance P(argmax(log p + g) = argmax(log q + g)), 1 when q = p).
        Sampled requests without a seed get an independent draw from q, kept for standard
        rejection sampling (acceptance sum(min(p, q)), the most any verifier gets).
        """
        logits = self._forward(chunks)  # [S, V]: the next-token logits of every chunk
        k_max = max(num_draft, default=0)
        active = [s for s, k in enumerate(num_draft) if k > 0]
        full = [num_draft[s] > 0 and not params[s].is_greedy and params[s].seed is None for s in range(len(chunks))]
        noise = [seeds[s] ^ DRAFT_SEED_SALT if full[s] else seeds[s] for s in range(len(chunks))]
        if k_max == 0:
            return Proposals([[] for _ in chunks], None, full)
        dev = self.device
        # Flat proposal slots, sequence-major: proposal j of sequence s sits at offset[s] + j.
        offset, total = {}, 0
        for s in active:
            offset[s], total = total, total + num_draft[s]
        tokens = torch.zeros(total, dtype=torch.int64, device=dev)  # [P]
        # [P, V]; rows of one-hot proposals (greedy or seeded requests) are never read
        q = torch.zeros(total, logits.shape[-1], device=dev) if any(full) else None
        live = active
        cur = logits[torch.tensor(live, device=dev)]  # [L, V]
        for j in range(k_max):
            t = SamplingTensors.build([params[s] for s in live], [noise[s] for s in live],
                                      [steps[s] + j for s in live], dev)  # fmt: skip
            picked = cur.argmax(dim=-1) if t.all_greedy else sample(cur, t)  # [L]
            slots = torch.tensor([offset[s] + j for s in live], device=dev)
            tokens[slots] = picked
            keep = [i for i, s in enumerate(live) if full[s]]
            if q is not None and keep:
                rows = torch.tensor(keep, device=dev)
                q[slots[rows]] = probs(cur[rows], t.select(rows))
            nxt = [i for i, s in enumerate(live) if num_draft[s] > j + 1]
            if not nxt:
                break
            live = [live[i] for i in nxt]
            feed = [SeqChunk([0], chunks[s].start + len(chunks[s].token_ids) + j, chunks[s].block_table) for s in live]
            cur = self._forward(feed, picked[torch.tensor(nxt, device=dev)])  # [L, V]
        host = tokens.tolist()
        out = [host[offset[s] : offset[s] + num_draft[s]] if s in offset else [] for s in range(len(chunks))]
        return Proposals(out, q, full)

    def complete(self, chunks: Sequence[SeqChunk], token_ids: Sequence[Sequence[int]]) -> None:
        """After verification: write the draft K/V of the last proposal of every chunk whose proposals
        were all accepted (`chunks` are the verified ones, ending in their proposals)."""
        feed = [
            SeqChunk([c.token_ids[-1]], c.start + len(c.token_ids) - 1, c.block_table)
            for c, out in zip(chunks, token_ids)
            if c.num_proposed > 0 and len(out) == c.num_proposed + 1
        ]
        if feed:
            self._forward(feed)
