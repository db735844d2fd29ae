"""aioffload serve | generate | plan | bench — every flag is defined here, once."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from aioffload.config import (
    ATTENTION_BACKENDS,
    DEMO_MODEL,
    DTYPES,
    HYBRID_MODES,
    LOOKAHEAD_MODES,
    SPECULATIVE_METHODS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    OffloadConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
)
from aioffload.serving.tool_parsers import PARSERS as TOOL_CALL_PARSERS

if TYPE_CHECKING:
    from aioffload.distributed.group import RankEnv



def _number(kind: type, ok: Callable[[float], bool], rule: str, allow: tuple[str, ...] = ()) -> Callable[[str], object]:
    """An argparse type: `kind(value)` satisfying `ok`, else "must be <rule>" (exit status 2)."""

    def parse(value: str) -> object:
        if value in allow:
            return value
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return v

    return parse


_trigger = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] or 'auto'", allow=("auto",))
_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
_non_negative_float = _number(float, lambda v: v >= 0, ">= 0")
_port = _number(int, lambda v: 1 <= v <= 65535, "a port number in [1, 65535]")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type) -> Callable[[str], object]:
    return _number(kind, lambda v: v > 0, "an integer > 0" if kind is int else "a number > 0")


def _origins(value: str) -> list[str]:
    """'https://a.example,https://b.example' -> the list; each is '*' or a scheme://host[:port] origin."""
    origins = [o.strip() for o in value.split(",") if o.strip()]
    for o in origins:
        if o != "*" and (not o.startswith(("http://", "https://")) or o.endswith("/")):
            raise argparse.ArgumentTypeError(f"{o!r} is not an origin like https://app.example.com (or '*')")
    return origins


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = (EngineConfig(model=""), CacheConfig(), SchedulerConfig(), OffloadConfig(), SpeculativeConfig())
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=DEMO_MODEL, help="Hugging Face model folder (default: the embedded demo model)")
    g.add_argument("--dtype", choices=DTYPES, default=d[0].dtype, help="weight dtype (default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto", help="(default: %(default)s)")
    g.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs (default: off)")
    g.add_argument("--seed", type=int, default=0, help="seed for requests without one (default: %(default)s)")
    g.add_argument("--max-model-len", type=_positive(int), default=None,
                   help="longest sequence, prompt + output (default: min(model limit, 4096))")
    g.add_argument("--max-num-seqs", type=_positive(int), default=d[2].max_num_seqs,
                   help="sequences per step (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=_positive(int), default=d[2].max_num_batched_tokens,
                   help="token budget per step (default: %(default)s; raised while offload is active)")
    g.add_argument("--max-prefill-tokens", type=_positive(int), default=d[2].max_prefill_tokens,
                   help="while no request is decoding, a prompt's first chunk may take this many tokens, so a "
                        "long prompt alone runs in one step (every weight resident; default: %(default)s, capped "
                        "by memory and --max-model-len)")
    g.add_argument("--max-queue", type=_positive(int), default=d[2].max_queue,
                   help="waiting requests before new ones get 503 (default: %(default)s)")
    g.add_argument("--lookahead", choices=LOOKAHEAD_MODES, default=d[2].lookahead,
                   help="launch each decode step before the last one's tokens reach the host; auto: where "
                        "decode runs as a CUDA graph (default: %(default)s)")
    g.add_argument("--block-size", type=_positive(int), default=d[1].block_size,
                   help="KV cache block size in tokens (default: %(default)s)")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=d[1].gpu_memory_utilization,
                   help="fraction of device memory for weights + KV cache (default: %(default)s)")
    g.add_argument("--num-kv-blocks", type=_positive(int), default=None,
                   help="fixed KV pool size in blocks (default: sized from free memory)")
    g.add_argument("--cpu-kv-cache-gb", type=_positive(float), default=d[1].cpu_kv_cache_gb,
                   help="KV cache size when running on the CPU (default: %(default)s)")
    o = p.add_argument_group("offload")
    o.add_argument("--trigger", type=_trigger, default=1.0,
                   help="keep weights on the GPU until memory in use would pass T x total; the rest streams from "
                        "pinned host memory. 1.0 = offload off, 'auto' = best predicted throughput (default: 1.0)")
    o.add_argument("--cpu-offload-gb", type=_non_negative_float, default=None,
                   help="keep this many GB of weights on the host instead of giving --trigger (default: none)")
    o.add_argument("--offload-prefetch", type=_positive(int), default=d[3].prefetch,
                   help="staging ring slots for streamed layers (default: %(default)s)")
    o.add_argument("--gpu-memory-gb", type=_positive(float), default=None,
                   help="count memory fractions against this many GB instead of the card (emulate a small card)")
    o.add_argument("--h2d-gbps", type=_positive(float), default=None,
                   help="host-to-device bandwidth to plan with (default: measured at startup, 25 on the CPU)")
    o.add_argument("--expert-cache-gb", type=_non_negative_float, default=None,
                   help="MoE: GPU cache of streamed experts (default: the memory the KV cache cannot use)")
    o.add_argument("--expert-stream", default=d[3].expert_stream, metavar="{auto,routed,full}",
                   help="MoE: copy the routed experts (routed), whole expert sets (full), or choose per layer "
                        "and step (default: %(default)s)")
    o.add_argument("--embed-on-host", action="store_true", help="keep the input embedding table on the host")
    o.add_argument("--hybrid", choices=HYBRID_MODES, default=d[3].hybrid,
                   help="host cores compute a share of each offloaded layer while the rest streams: auto = on when "
                        "offload is active on CUDA and the start-up calibration says it pays (default: %(default)s)")
    o.add_argument("--host-threads", type=_positive(int), default=None,
                   help="threads computing the host share (default: physical cores - 1)")
    sp = p.add_argument_group("speculative decoding")
    sp.add_argument("--speculative", choices=SPECULATIVE_METHODS, default=d[4].method,
                    help="proposals verified in the same step: ngram = prompt lookup, draft = --draft-model; "
                         "auto = ngram while offload is active, off otherwise (default: %(default)s)")
    sp.add_argument("--draft-model", default=None,
                    help="small checkpoint with the target's tokenizer, always resident (with --speculative draft)")
    sp.add_argument("--num-speculative-tokens", type=_positive(int), default=d[4].num_tokens,
                    help="the most proposals per sequence per step; the scheduler picks k <= this from measured "
                         "acceptance and the free token budget (default: %(default)s)")
    sp.add_argument("--ngram-min", type=_positive(int), default=d[4].ngram_min,
                    help="shortest suffix prompt lookup matches (default: %(default)s)")
    sp.add_argument("--ngram-max", type=_positive(int), default=d[4].ngram_max,
                    help="longest suffix prompt lookup matches (default: %(default)s)")
    tp = p.add_argument_group("tensor parallelism")
    tp.add_argument("--tensor-parallel-size", type=_positive(int), default=1,
                    help="shard every layer over N ranks, one process and one GPU each, started here (or by "
                         "torchrun, for several hosts); each rank offloads its own shard (default: 1)")
    tp.add_argument("--distributed-timeout", type=_positive(float), default=ParallelConfig().timeout_s,
                    help="seconds a collective between ranks may wait before the step fails (default: %(default)s)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        served_model_name=getattr(args, "served_model_name", None),
        cache=CacheConfig(
            block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks=args.num_kv_blocks, cpu_kv_cache_gb=args.cpu_kv_cache_gb,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_tokens=args.max_prefill_tokens, max_model_len=args.max_model_len, max_queue=args.max_queue,
            lookahead=args.lookahead,
        ),
        offload=OffloadConfig(
            trigger=args.trigger, cpu_offload_gb=args.cpu_offload_gb, prefetch=args.offload_prefetch,
            expert_cache_gb=args.expert_cache_gb, expert_stream=args.expert_stream,
            gpu_memory_gb=args.gpu_memory_gb, h2d_gbps=args.h2d_gbps, embed_on_host=args.embed_on_host,
            hybrid=args.hybrid, host_threads=args.host_threads,
        ),
        speculative=SpeculativeConfig(
            method=args.speculative, draft_model=args.draft_model, num_tokens=args.num_speculative_tokens,
            ngram_min=args.ngram_min, ngram_max=args.ngram_max,
        ),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, timeout_s=args.distributed_timeout),
    ).validate()  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aioffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(serve)
    h = serve.add_argument_group("server")
    s = ServerConfig()
    h.add_argument("--host", default=s.host, help="address to listen on")
    h.add_argument("--port", type=_port, default=s.port, help="port to listen on")
    h.add_argument("--served-model-name", default=None, help="model name in the API (default: the folder name)")
    h.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* routes")
    h.add_argument("--shutdown-timeout", type=_positive(float), default=s.shutdown_timeout_s,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    h.add_argument("--allowed-origins", type=_origins, action="extend", default=[],
                   help="CORS: browser origins allowed to call the API, comma-separated or repeated "
                        "(e.g. https://app.example.com, or '*'); default: CORS off")
    h.add_argument("--tool-call-parser", choices=tuple(TOOL_CALL_PARSERS), default=None,
                   help="tool-call format to read from the model's output (default: chosen by the chat template)")

    gen = sub.add_parser("generate", help="generate continuations offline (several --prompt run as one batch)")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-tokens", type=_positive(int), default=32, help="tokens to generate (default: 32)")
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=_fraction, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")

    plan = sub.add_parser("plan", help="print the placement plan without loading the weights")
    add_engine_args(plan)

    from aioffload.bench import add_bench_parsers

    add_bench_parsers(sub, add_engine_args)
    return parser


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # numpy is not a runtime dependency; torch warns at import when it is absent. Nothing here uses it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # configuration: every error is one line and exit status 2, before anything starts
        config = engine_config(args)
        config, rank_env = _check_parallel(config, args)
        if args.command == "plan":
            return _plan(config)
        if args.command in ("serve", "generate") and config.parallel.tensor_parallel_size == 1:
            check_before_start(config)  # under tensor parallelism, _check_parallel checked each rank's share
    except ValueError as e:  # ConfigError, CheckpointError, TokenizerError, SafetensorsError
        return config_error(e)
    setup_logging()
    ranks = None
    try:
        if config.parallel.tensor_parallel_size > 1 and args.command != "plan":  # plan loads nothing
            from aioffload.distributed.launch import join_torchrun, spawn_ranks
            from aioffload.worker.follower import follow
            from aioffload.worker.worker import pick_device

            device_type = pick_device(config.device).type
            if rank_env is not None and rank_env.rank != 0:  # a torchrun rank: do what rank 0 says
                follow(rank_env, device_type, config.parallel)
                return 0
            if rank_env is not None:
                parallel, ranks = join_torchrun(rank_env, config.parallel, device_type)
            else:
                parallel, ranks = spawn_ranks(config.parallel, device_type, follow)
            config = config.replace(parallel=parallel)
        return _run(config, args)
    except ConfigError as e:
        return config_error(e)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if ranks is not None:
            ranks.close()


def _run(config: EngineConfig, args: argparse.Namespace) -> int:
    if args.command == "serve":
        from aioffload.serving.app import run_server

        server = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              shutdown_timeout_s=args.shutdown_timeout,
                              allowed_origins=tuple(args.allowed_origins),
                              tool_call_parser=args.tool_call_parser)  # fmt: skip
        return run_server(config, server)
    if args.command == "generate":
        return asyncio.run(_generate(config, args))
    return int(args.run(config, args))


def _check_parallel(config: EngineConfig, args: argparse.Namespace) -> tuple[EngineConfig, RankEnv | None]:
    """--tensor-parallel-size against torchrun's environment, the bench kind and the model (config.json,
    when it is there already); ConfigError (one line) when they do not fit."""
    from aioffload.distributed.group import RankEnv

    env = RankEnv.from_environ() if args.command != "plan" else None
    size = config.parallel.tensor_parallel_size
    if env is not None and env.world_size > 1:
        if size not in (1, env.world_size):
            raise ConfigError(f"--tensor-parallel-size {size}: torchrun started {env.world_size} ranks")
        size = env.world_size
        config = config.replace(parallel=dataclasses.replace(config.parallel, tensor_parallel_size=size))
    elif env is not None:
        env = None  # torchrun with one rank: nothing to join
    if size == 1:
        return config, None
    if args.command == "bench" and not getattr(args, "tensor_parallel", False):
        raise ConfigError(f"--tensor-parallel-size {size}: bench {args.bench} compares workers side by side, one "
                          "process each; run bench latency or throughput")  # fmt: skip
    from aioffload.worker.tensor_parallel import check_parallel_start

    check_parallel_start(config, devices=env is None and args.command != "plan")
    return config, env


def config_error(e: Exception) -> int:
    """Print `error: MESSAGE` on one line of stderr; the exit status of a configuration error (2)."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


def check_before_start(config: EngineConfig) -> None:
    """What can be checked from headers alone, before a server binds or a model loads: the model
    folder, its config and tensor headers, the tokenizer, --max-model-len, the device, and the
    placement arithmetic (the worker repeats the last with the measured link and memory)."""
    from aioffload.checkpoint.checkpoint import Checkpoint, resolve_max_model_len
    from aioffload.checkpoint.tokenizer import Tokenizer
    from aioffload.offload.device import device_facts, pick_device, place

    ckpt = Checkpoint.open(config.model)
    Tokenizer.from_dir(config.model)
    max_len = resolve_max_model_len(config, ckpt)
    device = pick_device(config.device)
    dtype = ckpt.resolve_dtype(config.dtype, device)
    # Whether a plan exists does not depend on the link's speed: the worker measures it, once.
    place(config, ckpt.model_config, dtype.itemsize, max_len, device_facts(config, device, measure_link=False))


def _plan(config: EngineConfig) -> int:
    from aioffload.checkpoint.checkpoint import Checkpoint, resolve_max_model_len
    from aioffload.offload.device import pick_device
    from aioffload.offload.plan import run_plan

    ckpt = Checkpoint.open(config.model)
    device = pick_device(config.device)  # the plan is the one the worker would make here
    dtype = ckpt.resolve_dtype(config.dtype, device)
    return run_plan(config, ckpt.model_config, dtype, resolve_max_model_len(config, ckpt), str(ckpt.path), device)


async def _generate(config: EngineConfig, args: argparse.Namespace) -> int:
    from aioffload.engine.async_engine import Engine
    from aioffload.worker.sampling import SamplingParams, validate

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)  # fmt: skip
    validate(params)
    engine = Engine.from_config(config)

    async def one(i: int, prompt: str) -> str:
        parts = [out.text async for out in engine.generate(prompt, params, f"gen-{i}")]
        return "".join(parts)

    try:
        texts = await asyncio.gather(*(one(i, p) for i, p in enumerate(args.prompt)))
    finally:
        await engine.shutdown(1.0)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{text}" if len(args.prompt) == 1 else f"--- {prompt!r}\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
