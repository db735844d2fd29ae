"""The device side of a step: inputs -> forward -> sampling. It never decides who runs.

At start-up the worker places the weights (offload/placement.py), loads them, sizes the KV
cache from the memory really left after a warm-up forward at the largest step, and
captures CUDA graphs when every weight is resident. Each decision is logged.

Under tensor parallelism (worker/tensor_parallel.py) every rank builds its own Worker over its
shard; rank 0's is the engine's, and `execute` on it runs the step on every rank. Placement,
KV sizing and the hybrid split are per rank, on the rank's share of the model; the ranks agree
on the KV pool (the smallest), the copy floor (the largest) and rank 0's hybrid decision.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch

from aioffload.attention.backends import select_backend
from aioffload.attention.kv_cache import KVCache, kv_bytes_per_block
from aioffload.checkpoint.checkpoint import Checkpoint, resolve_max_model_len
from aioffload.config import ConfigError, EngineConfig
from aioffload.distributed.group import TPGroup
from aioffload.offload.device import device_facts, fixed_kv_blocks, pick_device, place
from aioffload.offload.expert_layers import MoeLayers
from aioffload.offload.placement import Placement
from aioffload.offload.transfer_queue import TransferQueue
from aioffload.worker.chunk_graphs import ChunkGraphRunner, mixed_buckets
from aioffload.worker.cuda_graphs import CudaGraphRunner
from aioffload.worker.draft import DraftModel, check_same_vocabulary
from aioffload.worker.graph_forward import step_logits
from aioffload.worker.hybrid import HybridPlan, plan_hybrid_ranks
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.masks import MaskFiller, fill_each
from aioffload.worker.mixed_warmup import warmup_steps
from aioffload.worker.model_loader import build_model
from aioffload.worker.outputs import StepOutput
from aioffload.worker.pending import PendingStep
from aioffload.worker.rejection import verify
from aioffload.worker.sampling import SamplingParams, sample_ids, sample_tokens
from aioffload.worker.shard_loader import build_sharded_model
from aioffload.worker.step_cost import (
    StepCost,
    measure_dense_flops,
    pair_cost,
    predict_step_cost,
    time_chunk_depths,
    time_decode_step,
)
from aioffload.worker.step_extras import SeqExtras, run_extras
from aioffload.worker.tensor_parallel import RunStep, TPLink

log = logging.getLogger("aioffload.worker")
# The most of the KV cache's memory a lone prompt's longer step may take for its activations.
IDLE_ACTIVATION_SHARE = 0.1


class Worker:
    def __init__(self, config: EngineConfig, ckpt: Checkpoint, tp: TPGroup | None = None) -> None:
        """`tp`: the group of a rank other than 0 (worker/follower.py); rank 0 joins the running one."""
        self.config = config
        self.device = pick_device(config.device) if tp is None else tp.device
        self.tp: TPLink | None = None
        self._pending_copies: list[tuple[int, int]] = []  # copy-on-write pairs the other ranks still need
        if config.parallel.tensor_parallel_size > 1:
            self.tp = TPLink.open(config, ckpt, self.device, tp)
        cuda = self.device.type == "cuda"
        self.dtype = ckpt.resolve_dtype(config.dtype, self.device)
        self.model_config = ckpt.model_config
        # What this rank computes: the whole model, or its tensor-parallel share of every layer.
        mcfg = self.shard_config = self.tp.local if self.tp else ckpt.model_config
        offload = self.tp.offload_config(config.offload) if self.tp else config.offload
        self.max_model_len = resolve_max_model_len(config, ckpt)
        self.block_size = config.cache.block_size
        self.attention = select_backend(config.attention_backend, self.device)
        elem = torch.empty((), dtype=self.dtype).element_size()
        # The same figures `aioffload plan` prints; under tensor parallelism the rank's own offload share.
        facts = device_facts(config, self.device)
        self.h2d_bytes_per_s, total, sched = facts.h2d_bytes_per_s, facts.total_bytes, config.scheduler
        self.placement: Placement = place(config.replace(offload=offload), mcfg, elem, self.max_model_len, facts)
        log.info("placement: %s", self.placement.reason)
        self.hybrid: HybridPlan | None = plan_hybrid_ranks(
            offload, mcfg, len(self.placement.offloaded_layers), self.dtype, self.device, self.h2d_bytes_per_s,
            self.tp.group if self.tp else None,
        )  # fmt: skip
        split, host = (self.hybrid.split, self.hybrid.host) if self.hybrid else (None, None)
        where = (frozenset(self.placement.offloaded_layers), self.placement.embed_on_host, config.offload.prefetch)
        if self.tp is None:
            self.model, self.layers = build_model(ckpt, self.dtype, self.device, self.attention, self.max_model_len,
                                                  *where, split, host, experts=self.placement.experts)  # fmt: skip
        else:
            self.model, self.layers = build_sharded_model(
                ckpt, mcfg, self.tp.ops, self.dtype, self.device, self.attention, self.max_model_len, *where, split,
                host,
            )
        self.draft = self._load_draft(ckpt) if self.tp is None or self.tp.leader else None  # rank 0's alone
        streamed = isinstance(self.layers, TransferQueue | MoeLayers)  # MoeLayers: 0 bytes when experts are resident
        self.offload_bytes_per_step = self.layers.bytes_per_step if streamed else 0
        if self.tp is not None:  # a step waits for the rank streaming the most
            self.offload_bytes_per_step = self.tp.group.max_int(self.offload_bytes_per_step)
        self.offload_active = self.offload_bytes_per_step > 0
        self.copy_floor_s = self.offload_bytes_per_step / self.h2d_bytes_per_s
        # Known before KV sizing, so the warm-up step profiles the largest step that will run.
        self.token_budget = sched.max_num_batched_tokens
        self.step_cost: StepCost | None = None  # CUDA: measured; the scheduler sizes prefill chunks from it
        if cuda:
            flops = measure_dense_flops(self.device, self.dtype, mcfg.hidden_size, mcfg.intermediate_size)
            exposed = len(self.placement.resident_layers) / mcfg.num_layers if self.offload_active else 1.0
            self.step_cost = predict_step_cost(mcfg, self.placement.layer_bytes // elem, flops, self.copy_floor_s,
                                               exposed)  # fmt: skip
            if self.offload_active:
                self.token_budget = self.step_cost.prefill_token_budget(sched.max_num_batched_tokens)
        self.attention.warm_dense(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device,
                                  self.token_budget, self.max_model_len)  # fmt: skip
        # A step's tokens while nobody decodes (a lone long prompt in one step): raised in _size_kv_cache
        # where its activations fit.
        self.idle_token_budget = self.token_budget
        self.num_blocks = self._size_kv_cache(total, elem)
        if self.idle_token_budget > self.token_budget:
            self.attention.warm_fresh(mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device,
                                      self.token_budget, self.idle_token_budget)  # fmt: skip
        if self.tp is not None:  # one block table serves every rank
            self.num_blocks = self.tp.group.min_int(self.num_blocks)
        self.kv = KVCache(
            mcfg.num_layers, self.num_blocks, self.block_size, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device
        )
        if self.draft is not None:
            self.draft.allocate_kv(self.num_blocks)
        block_bytes = self._block_bytes(elem)
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GB)",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size, self.num_blocks * block_bytes / 1e9,
        )  # fmt: skip
        # Fills logits-mask rows (worker/masks.py); a grammar library's batch filler may replace it.
        self.fill_masks: MaskFiller = fill_each
        self.graphs: CudaGraphRunner | None = None
        self.chunk_graphs: ChunkGraphRunner | None = None
        # Steps mixing decode tokens with prefill chunks: through the graphs where they take them
        # (worker/graph_forward.py: a mixed graph, or the decode graph and the chunks behind it;
        # True), or the whole step eager (False). scripts/gpu/profile_decode.py measures both.
        self.mixed_via_graph = True
        reason = self._graph_decision()
        if reason is None:
            self._choose_gemv_shapes()
            t = time.perf_counter()
            max_blocks = -(-self.max_model_len // self.block_size)
            self.graphs = CudaGraphRunner(self.model, self.kv, sched.max_num_seqs, max_blocks)
            if self.tp is None and not isinstance(self.layers, MoeLayers):  # padding rows would be routed
                self.chunk_graphs = ChunkGraphRunner(self.model, self.kv, max_blocks,
                                                     decode_buckets=mixed_buckets(self.graphs.sizes))  # fmt: skip
            log.info("CUDA graphs: on (every weight resident; captured in %.1f s)", time.perf_counter() - t)
        else:
            log.info("CUDA graphs: off (%s)", reason)
            if cuda and self.tp is None:
                self._warm_mixed_steps()
        # Rank 0 alone times a step: each of its steps is posted to the other ranks, which run it
        # from their command loop; steps timed on their own here would pair with rank 0's next ones.
        if self.step_cost is not None and (self.tp is None or self.tp.leader):
            sizes = self.chunk_graphs.inputs.sizes if self.chunk_graphs is not None else ()
            self.step_cost = dataclasses.replace(self.step_cost, decode_s=time_decode_step(self), chunk_sizes=sizes)
            depths = time_chunk_depths(self)
            if depths is not None:  # the attention of a graphed chunk deep in a prompt, as measured
                shallow, deep, rows, depth = depths
                pair = pair_cost(shallow, deep, rows, depth)
                log.info("chunk graph of %d tokens: %.2f ms at position 0, %.2f ms at %d", rows, shallow * 1e3,
                         deep * 1e3, depth)  # fmt: skip
                self.step_cost = dataclasses.replace(self.step_cost, pair_s=max(self.step_cost.pair_s, pair))
            log.info("step cost: %s", self.step_cost.describe())

    def _warm_mixed_steps(self) -> None:
        """Compile the eager mixed step's kernel variants now, not under the first long prompt that
        arrives beside decoding requests (worker/mixed_warmup.py); logged."""
        t = time.perf_counter()
        steps = warmup_steps(self.config.scheduler.max_num_seqs, self.token_budget,
                             self.attention.dense_min_rows or 1024, self.block_size, self.num_blocks)  # fmt: skip
        for chunks in steps:
            self._step(chunks, self._host_share(chunks), False)
            torch.cuda.synchronize(self.device)  # the host's share, if any, is done too
            if self.hybrid is not None:
                self.hybrid.discard_step()
        log.info("warm-up: %d mixed steps (%s decode rows beside a prefill chunk) in %.2f s", len(steps),
                 " and ".join(str(len(c) - 1) for c in steps) or "no", time.perf_counter() - t)  # fmt: skip

    def _choose_gemv_shapes(self) -> None:
        """Which weight shapes one-row steps run through the Triton GEMV (worker/gemv_choice.py), timed
        on the resident layers' own weights, where the model's ops route through it; logged."""
        if self.device.type != "cuda":
            return
        from aioffload.model import gemv
        from aioffload.worker.gemv_choice import choose_gemv_shapes, layer_matrices

        if getattr(self.model.ops, "linear", None) is not gemv.linear:  # the plain ops (another backend)
            return
        layers = [self.layers.acquire(i) for i in self.placement.resident_layers]
        times = choose_gemv_shapes(layer_matrices(layers))
        for i in self.placement.resident_layers:
            self.layers.release(i)
        log.info("one-row matmuls: Triton GEMV for %s, cuBLAS for the rest (us per matrix, cuBLAS / GEMV: %s)",
                 ", ".join(k for k, (_, _, g) in times.items() if g) or "none",
                 ", ".join(f"{k} {c} / {g}" for k, (c, g, _) in times.items()))  # fmt: skip

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src's K/V (the draft's too) to block dst, for each (src, dst) the block
        manager queued; called before the step whose writes need them (under tensor parallelism the
        other ranks copy theirs when that step reaches them)."""
        self.kv.copy_blocks(pairs)
        if self.draft is not None and self.draft.kv is not None:
            self.draft.kv.copy_blocks(pairs)
        if self.tp is not None and self.tp.leader:
            self._pending_copies.extend(pairs)

    def _load_draft(self, ckpt: Checkpoint) -> DraftModel | None:
        """The --speculative draft model, fully resident; refused unless it shares the target's vocabulary."""
        spec = self.config.speculative
        if spec.method != "draft" or spec.draft_model is None:
            return None
        draft = Checkpoint.open(spec.draft_model)
        check_same_vocabulary(ckpt.path, self.model_config, draft.path, draft.model_config)
        return DraftModel(draft, self.dtype, self.device, self.attention, self.max_model_len, self.block_size)

    def _block_bytes(self, elem: int) -> int:
        """KV bytes of one block id: the target's K/V, plus the draft's over the same block ids."""
        m = self.shard_config
        target = kv_bytes_per_block(m.num_layers, self.block_size, m.num_kv_heads, m.head_dim, elem)
        return target + (self.draft.kv_bytes_per_block() if self.draft is not None else 0)

    def _graph_decision(self) -> str | None:
        """None when graphs should be captured, else why not."""
        if self.device.type != "cuda":
            return "CPU device"
        if self.config.enforce_eager:
            return "--enforce-eager"
        if self.offload_active:
            return f"{len(self.placement.offloaded_layers)} layers offloaded: streamed eager path"
        if self.attention.name != "torch":
            return f"attention backend {self.attention.name} is not graph-safe"
        if isinstance(self.layers, MoeLayers) and not self.layers.graph_safe:
            return "MoE experts without torch._grouped_mm read their token counts on the host"
        return None

    def _size_kv_cache(self, total: int, elem: int) -> int:
        cfg = self.config
        block_bytes = self._block_bytes(elem)
        need = -(-self.max_model_len // self.block_size)
        fixed = fixed_kv_blocks(cfg, self.device, block_bytes)
        idle = self._idle_budget_wanted(fixed is not None)  # tokens to try, or None
        if fixed is not None:
            blocks = fixed
        else:
            peak = self._profile_peak_bytes(self.token_budget)
            if idle is not None:
                peak = self._take_idle_budget(idle, peak, cfg.cache.gpu_memory_utilization * total)
            budget = cfg.cache.gpu_memory_utilization * total - peak
            free_now = torch.cuda.mem_get_info(self.device)[0] - (256 << 20)
            blocks = int(min(budget, free_now) // block_bytes)
            log.info(
                "memory: %.2f GB in use at peak of a %d-token warm-up step; budget %.2f GB (%.0f%% of %.1f GB)",
                peak / 1e9, self.idle_token_budget, cfg.cache.gpu_memory_utilization * total / 1e9,
                cfg.cache.gpu_memory_utilization * 100, total / 1e9,
            )  # fmt: skip
        if blocks < need:
            raise ConfigError(
                f"the KV cache has room for {max(blocks, 0) * self.block_size} tokens, fewer than one "
                f"--max-model-len {self.max_model_len} sequence: lower --max-model-len or --trigger, or raise "
                "--gpu-memory-utilization"
            )
        return blocks

    def _idle_budget_wanted(self, fixed_blocks: bool) -> int | None:
        """--max-prefill-tokens capped at max_model_len, where a step with nobody decoding may try to
        take that many tokens (more than the token budget); None otherwise, logged when it is why not."""
        wanted = min(self.config.scheduler.max_prefill_tokens, self.max_model_len)
        if wanted <= self.token_budget:
            return None
        why_not = self._idle_budget_refused(fixed_blocks)
        if why_not is not None:
            log.info("a step with nobody decoding stays at the token budget, %d tokens (%s)", self.token_budget,
                     why_not)  # fmt: skip
            return None
        return wanted

    def _idle_budget_refused(self, fixed_blocks: bool) -> str | None:
        """Why this worker keeps its token budget with nobody decoding (None: it may raise it)."""
        if self.device.type != "cuda":
            return "CPU device"
        if self.offload_active:
            return "offload is active: its token budget is raised from the copy floor instead"
        if self.tp is not None:
            return "tensor parallel"
        if fixed_blocks:
            return "--num-kv-blocks fixes the KV cache, so its activations are not measured"
        return None

    def _take_idle_budget(self, tokens: int, peak: int, usable: float) -> int:
        """Raise idle_token_budget to `tokens` when a step of them needs at most IDLE_ACTIVATION_SHARE of
        the memory the KV cache would get at the token budget's peak; returns the peak to size it with."""
        idle_peak = self._profile_peak_bytes(tokens)
        extra, room = idle_peak - peak, usable - peak
        if extra > IDLE_ACTIVATION_SHARE * room:
            log.info("a step with nobody decoding stays at the token budget, %d tokens: one of %d tokens takes "
                     "%.2f GB more activations, over %.0f%% of the %.2f GB left for the KV cache", self.token_budget,
                     tokens, extra / 1e9, IDLE_ACTIVATION_SHARE * 100, room / 1e9)  # fmt: skip
            return peak
        self.idle_token_budget = tokens
        log.info("a step with nobody decoding takes up to %d tokens (a lone prompt's first chunk): %.2f GB more "
                 "activations of the %.2f GB left for the KV cache", tokens, extra / 1e9, room / 1e9)  # fmt: skip
        return idle_peak

    def _profile_peak_bytes(self, budget: int) -> int:
        """Peak device memory of a warm-up forward of a `budget`-token step (weights included)."""
        sched, mcfg = self.config.scheduler, self.shard_config
        tokens = min(budget, self.max_model_len * sched.max_num_seqs)
        seqs = max(1, min(sched.max_num_seqs, -(-tokens // self.max_model_len)))
        per = -(-tokens // seqs)
        blocks_per = -(-per // self.block_size)
        tmp = KVCache(mcfg.num_layers, seqs * blocks_per, self.block_size, mcfg.num_kv_heads, mcfg.head_dim,
                      self.dtype, self.device)  # fmt: skip
        tmp_bytes = sum(t.numel() * t.element_size() for t in tmp.k + tmp.v)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        chunks = [
            SeqChunk([0] * per, 0, list(range(s * blocks_per, (s + 1) * blocks_per))) for s in range(seqs)
        ]
        inp = build_inputs(chunks, self.block_size, self.device, self.attention.dense_min_rows)
        self.model.forward(inp.input_ids, inp.positions, inp.meta, tmp)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - tmp_bytes
        del tmp, inp
        torch.cuda.empty_cache()
        return peak

    def expert_stats(self) -> dict[str, float]:
        """MoE expert streaming counters for /metrics (cache hit rate, bytes per step); {} otherwise."""
        return self.layers.stats() if isinstance(self.layers, MoeLayers) else {}

    def execute(
        self,
        chunks: Sequence[SeqChunk],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        num_draft: Sequence[int] | None = None,
        extras: Sequence[SeqExtras | None] | None = None,
    ) -> StepOutput:
        """Run one step; per chunk, the tokens it emits (callers ignore those of chunks mid-prefill).

        A chunk with num_logits = m > 1 ends in m - 1 proposed tokens, verified here in the same
        forward (worker/rejection.py), unless it has prompt_targets (prompt logprobs: no proposals).
        With a draft model, the draft first proposes num_draft[i] tokens after chunk i (whose
        num_logits is then 1). `steps[i]` is the output index of the token chunk i's first logits
        row samples. `extras` (None: no request of the step asks; required with prompt_targets):
        logprobs, penalties and masks, per chunk (worker/step_extras.py).
        """
        draft_probs, full = None, None
        if self.draft is not None:
            seen = [SeqChunk(c.token_ids, c.start, c.block_table) if c.prompt_targets else c for c in chunks]
            prop = self.draft.propose(seen, num_draft or [0] * len(chunks), params, seeds, steps)
            if any(prop.token_ids):
                chunks = [
                    SeqChunk([*c.token_ids, *d], c.start, c.block_table, c.num_logits + len(d)) if d else c
                    for c, d in zip(chunks, prop.token_ids, strict=True)
                ]
                draft_probs, full = prop.probs, prop.full
        share = self._host_share(chunks)  # proposals counted in
        plain = all(c.num_logits == 1 for c in chunks)
        argmax = extras is None and plain and all(p.is_greedy for p in params)
        logits = self._step(chunks, share, argmax)
        if logits.dtype == torch.int64:  # the ranks' argmax of an all-greedy step
            out = StepOutput([[t] for t in logits.tolist()], [0] * len(chunks))
        elif extras is not None:
            out = run_extras(logits, chunks, params, seeds, steps, extras, draft_probs, full, self.fill_masks,
                             pin=self.device.type == "cuda")  # fmt: skip
        elif plain:
            out = StepOutput([[t] for t in sample_tokens(logits, params, seeds, steps)], [0] * len(chunks))
        else:
            proposals = [list(c.token_ids[len(c.token_ids) - c.num_logits + 1 :]) for c in chunks]
            out = StepOutput(verify(logits, proposals, params, seeds, steps, draft_probs, full),
                             [len(p) for p in proposals])  # fmt: skip
        if self.hybrid is not None:
            self.hybrid.after_step()  # the step is done (sampling waited): host failures, measured shares
        if self.draft is not None and any(out.num_proposed):
            self.draft.complete(chunks, out.token_ids)
        return out

    def can_launch(self, num_seqs: int) -> bool:
        """Whether `launch` takes a decode step of num_seqs sequences. On CUDA only the decode graphs
        do (every weight resident): an eager or offloaded step would wait on the host anyway. On the
        CPU any plain worker does, synchronously (so the engine's lookahead runs in CPU tests)."""
        if self.tp is not None or self.draft is not None or self.hybrid is not None:
            return False
        if self.device.type != "cuda":
            return not isinstance(self.layers, TransferQueue | MoeLayers)
        return self.graphs is not None and num_seqs <= self.graphs.sizes[-1]

    def launch(
        self,
        chunks: Sequence[SeqChunk],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        feed: PendingStep | None = None,
        feed_rows: Sequence[int] | None = None,
    ) -> PendingStep:
        """Queue a plain decode step (one token and one logits row per chunk; `can_launch`) and return
        without waiting for it. With `feed`, chunk i's token is row feed_rows[i] of that earlier
        step's ids, read on the device; the chunk's token_ids[0] is a placeholder. Sampling is as in
        `execute`, so the ids equal a plain step's."""
        assert all(len(c.token_ids) == 1 and c.num_logits == 1 for c in chunks), "launch takes decode steps"
        if self.graphs is not None and self.graphs.can_run(chunks):
            logits = self.graphs.run(chunks, feed.ids if feed is not None else None, feed_rows)
        else:  # the CPU: the feed's ids are on the host already
            if feed is not None:
                assert feed_rows is not None
                ids = feed.wait()
                chunks = [SeqChunk([ids[r]], c.start, c.block_table) for c, r in zip(chunks, feed_rows, strict=True)]
            logits = self._forward(chunks)
        return PendingStep(sample_ids(logits, params, seeds, steps))

    def _host_share(self, chunks: Sequence[SeqChunk]) -> int | None:
        """The hybrid split's host share (chunks of each offloaded layer) for this step; None without one."""
        if self.hybrid is None or not isinstance(self.layers, TransferQueue):
            return None
        return self.hybrid.before_step(sum(len(c.token_ids) for c in chunks))

    def follow(self, step: RunStep) -> None:
        """A rank other than 0: rank 0's step on this rank's shard (its logits go to rank 0)."""
        if step.block_copies:
            self.kv.copy_blocks(step.block_copies)
        self._step(step.chunks, step.host_share, step.argmax)
        if self.hybrid is not None:
            self.hybrid.after_step()

    def _forward(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Logits [R, V] of one step, through the CUDA graphs where they take it (worker/graph_forward.py)."""
        return step_logits(chunks, self.model, self.kv, self.block_size, self.graphs, self.chunk_graphs,
                           mixed=self.tp is None and self.mixed_via_graph)  # fmt: skip

    def _step(self, chunks: Sequence[SeqChunk], host_share: int | None, argmax: bool) -> torch.Tensor:
        """The forward on every rank -> logits [R, V] float32, or under tensor parallelism with
        `argmax` the ids [R] int64 (on rank 0; the other ranks get an empty tensor back)."""
        if self.tp is not None and self.tp.leader:
            self.tp.post_step(chunks, argmax, host_share, self._pending_copies)
            self._pending_copies = []
        if host_share is not None and self.hybrid is not None and isinstance(self.layers, TransferQueue):
            self.layers.set_split(host_share)
        try:
            logits = self._forward(chunks)
        except BaseException:
            if isinstance(self.layers, TransferQueue):
                self.layers.reset()
            raise
        if self.tp is None:
            return logits
        whole = self.tp.collect(logits, argmax)
        return whole if whole is not None else logits[:0]
