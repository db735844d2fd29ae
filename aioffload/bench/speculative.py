"""Speculative decoding under offload (issue 12): what verifying proposals costs, and what it buys
against the copy floor.

One run on one GPU, on the synthetic Llama-3-8B shape with 24 of 32 layers streamed (an emulated
24 GB card, bench/offload.py's trigger arithmetic):
1. verification cost: decode steps at each batch size carrying 0, 4, 8 extra (proposal) rows per
   sequence, through Worker.execute; the ratio to the plain step.
2. an agreeing draft (an UPPER BOUND): the target's own greedy continuation fed back as the
   proposals, so every proposal is accepted and the step carries k + 1 output tokens per sequence;
   ms per output token against the copy floor. "Its own continuation" is taken from the
   verification forward itself (a fixed point, found by untimed probe steps: Jacobi iteration),
   because on random bf16 weights the logits tie at the top often and a 1-row step breaks those
   ties differently from a (k + 1)-row one; the tokens are also compared with plain 1-row greedy.
3. prompt lookup on a realistic prompt set (summaries and code edits, bench/spec_prompts.py) through
   the engine, against --speculative off. The synthetic model has random weights: its step times
   are real, its acceptance is not (its text neither copies nor means anything).
4. acceptance on real text: the same prompts on the trained demo model (resident, tiny), prompt
   lookup and an identical draft model, each checked token-identical to --speculative off.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from aioffload.bench import common
from aioffload.bench.common import GREEDY, phase, say
from aioffload.bench.offload import emulated_offload
from aioffload.bench.spec_prompts import prompt_set
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from aioffload.engine.async_engine import Engine
from aioffload.worker.inputs import SeqChunk
from aioffload.worker.sampling import SamplingParams
from aioffload.worker.worker import Worker, pick_device

NAME = "speculative"
DEMO = DEMO_MODEL
DEMO_KV_BLOCKS = 4096  # 65,536 tokens: 8 prompts of a few hundred tokens, any k


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resident-layers", type=int, default=8, help="decoder layers kept on the GPU (default: 8)")
    p.add_argument("--batch-sizes", type=common.int_list, default=[1, 8], help="(default: 1,8)")
    p.add_argument("--extra-rows", type=lambda v: [int(x) for x in v.split(",")], default=[0, 4, 8],
                   help="proposal rows per sequence in the verification phase (default: 0,4,8)")
    p.add_argument("--context-len", type=int, default=128, help="prompt tokens of the timed steps (default: 128)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per point (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--agree-k", type=int, default=8, help="proposals per step of the agreeing draft (default: 8)")
    p.add_argument("--num-prompts", type=int, default=8, help="realistic prompts, run at once (default: 8)")
    p.add_argument("--output-len", type=int, default=64, help="tokens per prompt, EOS ignored (default: 64)")
    common.add_synthetic_args(p, default="llama3-8b")


def run(config: EngineConfig, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    R: dict = {"bench": NAME, "torch": torch.__version__, "errors": {}}
    with phase(R, "checkpoint"):
        config = common.resolve_model(config, args)
    if "checkpoint" in R["errors"]:
        common.write_json("speculative.json", R)
        return 1
    ckpt = Checkpoint.open(config.model)
    mcfg, dev = ckpt.model_config, pick_device(config.device)
    dtype = ckpt.resolve_dtype(config.dtype, dev)
    gpu_gb = config.offload.gpu_memory_gb or 24.0
    seqs = max(config.scheduler.max_num_seqs, max(args.batch_sizes) * (max(args.extra_rows + [args.agree_k]) + 1))
    off = common.with_offload(common.with_scheduler(config, max_num_seqs=seqs), gpu_memory_gb=gpu_gb)
    off = off.replace(speculative=SpeculativeConfig(method="off"))
    R.update(model=config.model, device=common.device_name(dev), emulated_gpu_gb=gpu_gb, max_num_seqs=seqs)
    worker: Worker | None = None
    with phase(R, "offload_worker"):
        bw = common.measure_h2d(dev, 436 << 20)
        worker = common.build_worker(emulated_offload(off, mcfg, dtype.itemsize, 0.0, args.resident_layers))
        r = len(worker.placement.resident_layers)
        bw = bw or worker.h2d_bytes_per_s
        R["floor_ms"] = round(worker.offload_bytes_per_step / bw * 1e3, 3)
        R["plan"] = {"resident_layers": r, "offloaded_layers": len(worker.placement.offloaded_layers),
                     "h2d_GBps": round(bw / 1e9, 2), "token_budget": worker.token_budget}  # fmt: skip
        say(f"copy floor {R['floor_ms']} ms ({worker.offload_bytes_per_step / 1e9:.2f} GB at {bw / 1e9:.1f} GB/s)")
    if worker is not None:
        with phase(R, "verification"):
            R["verification"] = [_verification(worker, b, k, args) for b in args.batch_sizes for k in args.extra_rows]
        with phase(R, "agreeing_draft"):
            R["agreeing"] = [_agreeing(worker, b, args, R["floor_ms"]) for b in args.batch_sizes]
        with phase(R, "ngram_synthetic"):
            R["ngram_synthetic"] = _engine_pair(worker, args)
        del worker
        common.free_device_memory()
    with phase(R, "demo_acceptance"):
        R["demo"] = _demo(config, args)
    R["total_s"] = round(time.perf_counter() - t0, 1)
    common.write_json("speculative.json", R)
    _table(R)
    return 0 if not R["errors"] else 1


class _Driver(common.StepDriver):
    """StepDriver plus decode steps that carry proposals; rejected ones are rolled back as the engine does."""

    def spec_step(self, proposals: list[list[int]]) -> tuple[float, list[list[int]]]:
        chunks = []
        for i, props in enumerate(proposals):
            seq = self.seqs[i]
            if not self.bm.allocate_slots(i, len(seq) + len(props)):
                raise RuntimeError(f"KV pool exhausted for sequence {i}")
            chunks.append(SeqChunk([seq[-1], *props], len(seq) - 1, self.bm.block_table(i), len(props) + 1))
        steps = [len(s) - n for s, n in zip(self.seqs, self.prompt_lens)]
        common.sync_compute(self.worker.device)
        t = time.perf_counter()
        out = self.worker.execute(chunks, [GREEDY] * len(chunks), [0] * len(chunks), steps).token_ids
        common.sync_compute(self.worker.device)
        dt = time.perf_counter() - t
        for i, tokens in enumerate(out):
            self.seqs[i].extend(tokens)
            self.done[i] = len(self.seqs[i]) - 1
            self.bm.truncate(i, self.done[i])
        return dt, out

    def probe(self, proposals: list[list[int]]) -> list[list[int]]:
        """spec_step's tokens without committing them (the KV written is rolled back)."""
        seqs, done = [list(s) for s in self.seqs], list(self.done)
        _, out = self.spec_step(proposals)
        for i in range(len(seqs)):
            self.bm.truncate(i, done[i])
        self.seqs, self.done = seqs, done
        return out

    def fixed_point(self, guess: list[list[int]]) -> tuple[list[list[int]], int]:
        """Proposals the verification forward accepts in full: probe, keep the accepted prefix plus
        the token the step chose instead, repeat. A row's logits depend only on the rows before it
        (causal attention; matmul rows are independent at a fixed shape), so each probe fixes at
        least one more position: at most k + 1 probes. Returns (proposals, probes)."""
        props = [list(g) for g in guess]
        for n in range(1, max(len(p) for p in props) + 2):
            out = self.probe(props)
            if all(len(o) == len(p) + 1 for o, p in zip(out, props)):
                return props, n
            props = [o[: len(p)] + p[len(o) :] if len(o) <= len(p) else p for o, p in zip(out, props)]
        raise RuntimeError("the verification forward has no fixed point: it is not deterministic")


def _verification(worker: Worker, batch: int, k: int, args: argparse.Namespace) -> dict:
    """Steps of `batch` sequences each verifying k random proposals (all rejected: context grows by 1)."""
    vocab = worker.model_config.vocab_size
    n = args.warmup + args.steps
    d = _Driver(worker, common.random_prompts(batch, args.context_len, vocab, seed=batch), n * (k + 1) + 1)
    d.prefill()
    junk = common.random_prompts(batch * n, max(k, 1), vocab, seed=99)
    times = [d.spec_step([junk.pop()[:k] for _ in range(batch)])[0] for _ in range(n)]
    s = common.summarize(times[args.warmup :], 1e3)
    say(f"verify b={batch} +{k} rows: p50 {s['p50']:.2f} ms")
    return {"batch": batch, "extra_rows": k, "step_ms": s["p50"], "stats_ms": s}


def _agreeing(worker: Worker, batch: int, args: argparse.Namespace, floor_ms: float) -> dict:
    """UPPER BOUND: proposals the target itself would emit (the verification forward's own greedy
    continuation, Driver.fixed_point, untimed), so each timed step emits k + 1 tokens."""
    k, n_steps = args.agree_k, args.warmup + args.steps
    prompts = common.random_prompts(batch, args.context_len, worker.model_config.vocab_size, seed=7 + batch)
    want = common.greedy_tokens(worker, prompts, 1 + (k + 1) * n_steps)  # plain 1-row steps, for comparison
    d = _Driver(worker, prompts, 2 + (k + 1) * n_steps)
    d.prefill()
    times, emitted, probes = [], 0, []
    for _ in range(n_steps):
        pos = len(d.seqs[0]) - len(prompts[0])  # outputs so far, the same for every sequence
        props, n = d.fixed_point([w[pos : pos + k] for w in want])
        probes.append(n)
        dt, out = d.spec_step(props)
        times.append(dt)
        emitted += sum(len(o) for o in out)
    got = d.outputs()
    s = common.summarize(times[args.warmup :], 1e3)
    per_step = emitted / n_steps / batch
    ms_tok = s["p50"] / per_step
    same = sum(g == w[: len(g)] for g, w in zip(got, want))
    say(f"agreeing draft b={batch} k={k}: {per_step:.2f} tokens/step/seq, {ms_tok:.2f} ms per output token "
        f"= {ms_tok / floor_ms:.3f}x the copy floor (upper bound; {sum(probes)} untimed probe steps found the "
        f"proposals; {same} of {batch} sequences equal plain 1-row greedy)")  # fmt: skip
    return {"batch": batch, "k": k, "step_ms": s["p50"], "tokens_per_step": round(per_step, 3),
            "ms_per_token": round(ms_tok, 3), "ratio_to_floor": round(ms_tok / floor_ms, 4),
            "all_accepted": per_step == k + 1, "probe_steps": probes,
            "identical": got == [w[: len(g)] for g, w in zip(got, want)], "upper_bound": True}  # fmt: skip


async def _engine_texts(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def one(i: int, p: list[int]) -> list[int]:
        return [t async for out in engine.generate(p, params, f"spec-{i}") for t in out.token_ids]

    t = time.perf_counter()
    try:
        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await engine.shutdown(1.0)
    elapsed = time.perf_counter() - t
    s = engine.stats()
    proposed, accepted = s["spec_proposed_tokens_total"], s["spec_accepted_tokens_total"]
    # Per sequence (all run at once), the prefill included.
    return {"elapsed_s": round(elapsed, 3), "ms_per_token": round(elapsed * 1e3 / output_len, 2),
            "steps": s["steps_total"], "proposed": proposed, "accepted": accepted,
            "acceptance": round(accepted / max(1, proposed), 3),
            "mean_accepted_length": round(s["spec_mean_accepted_length"], 3), "tokens": outs}  # fmt: skip


def _engine_pair(worker: Worker, args: argparse.Namespace) -> dict:
    """The realistic prompts through the engine on the offloaded worker: off, then prompt lookup."""
    vocab = worker.model_config.vocab_size  # the demo tokenizer's ids: < 4096, within the 8B's vocabulary
    tok = Tokenizer.from_dir(DEMO)
    prompts = [[t % vocab for t in tok.encode(p)] for p in prompt_set(args.num_prompts)]
    out = {}
    for method in ("off", "ngram"):
        cfg = worker.config.replace(speculative=SpeculativeConfig(method=method))
        out[method] = asyncio.run(_engine_texts(Engine(cfg, worker, tok, "bench"), prompts, args.output_len))
        say(f"synthetic 8B, {method}: {out[method]['ms_per_token']} ms per output token per sequence, "
            f"acceptance {out[method]['acceptance']} (random weights: not a real acceptance figure)")  # fmt: skip
    out["identical"] = out["off"].pop("tokens") == out["ngram"].pop("tokens")
    return out


def _demo(config: EngineConfig, args: argparse.Namespace) -> dict:
    """Acceptance on real text: the demo model (resident), prompt lookup and an identical draft vs off."""
    tok = Tokenizer.from_dir(DEMO)
    prompts = [tok.encode(p) for p in prompt_set(args.num_prompts)]
    # A fixed pool: sized from free memory, the first engine's cache would take the whole card
    # before the next one starts (each is dropped and its memory returned below, too).
    base = EngineConfig(model=DEMO, device=config.device, scheduler=SchedulerConfig(max_num_seqs=128),
                        cache=CacheConfig(num_blocks=DEMO_KV_BLOCKS)).validate()  # fmt: skip
    out = {}
    for name, spec in (("off", SpeculativeConfig(method="off")), ("ngram", SpeculativeConfig(method="ngram")),
                       ("draft", SpeculativeConfig(method="draft", draft_model=DEMO))):  # fmt: skip
        engine = Engine.from_config(base.replace(speculative=spec))
        if engine.speculation is not None:  # k from acceptance alone: this draft costs what its target does
            engine.speculation.draft_step_s = 0.0
        out[name] = asyncio.run(_engine_texts(engine, prompts, args.output_len))
        del engine
        common.free_device_memory()
        say(f"demo model, {name}: acceptance {out[name]['acceptance']}, mean accepted length "
            f"{out[name]['mean_accepted_length']}, {out[name]['steps']} steps")  # fmt: skip
    off = out["off"].pop("tokens")
    for name in ("ngram", "draft"):
        out[name]["identical"] = out[name].pop("tokens") == off
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _table(R: dict) -> None:
    rows: list[list] = [["figure", "value", "reference", "ratio"]]
    floor = R.get("floor_ms")
    plan = R.get("plan", {})
    rows.append([f"copy floor ms ({plan.get('offloaded_layers')} layers streamed)", floor, None, None])
    base = {v["batch"]: v["step_ms"] for v in R.get("verification", []) if v["extra_rows"] == 0}
    for v in R.get("verification", []):
        ref = base.get(v["batch"])
        rows.append([f"verify b={v['batch']} +{v['extra_rows']} rows ms", v["step_ms"], ref,
                     _ratio(v["step_ms"], ref)])  # fmt: skip
    for a in R.get("agreeing", []):
        rows.append([f"agreeing draft b={a['batch']} k={a['k']} ms/token (upper bound)", a["ms_per_token"], floor,
                     a["ratio_to_floor"]])  # fmt: skip
        rows.append([f"agreeing draft b={a['batch']} every proposal accepted / probe steps", a["all_accepted"],
                     sum(a["probe_steps"]), None])  # fmt: skip
        rows.append([f"agreeing draft b={a['batch']} tokens == plain 1-row greedy", a["identical"], None, None])
    n = R.get("ngram_synthetic")
    if n:
        rows.append(["ngram synthetic (random weights) ms/token incl. prefill", n["ngram"]["ms_per_token"],
                     n["off"]["ms_per_token"], _ratio(n["ngram"]["ms_per_token"], n["off"]["ms_per_token"])])
        rows.append(["ngram synthetic acceptance (not meaningful)", n["ngram"]["acceptance"], None,
                     _ratio(n["ngram"]["steps"], n["off"]["steps"])])  # fmt: skip
        rows.append(["ngram synthetic == off", n["identical"], None, None])
    d = R.get("demo")
    if d:
        for name in ("ngram", "draft"):
            rows.append([f"demo {name}: mean accepted length / acceptance / steps vs off",
                         d[name]["mean_accepted_length"], d[name]["acceptance"],
                         _ratio(d[name]["steps"], d["off"]["steps"])])  # fmt: skip
            rows.append([f"demo {name} == off", d[name]["identical"], None, None])
    if R["errors"]:
        rows.append(["errors", ", ".join(R["errors"]), None, None])
    common.print_table(rows)
