"""`aioffload bench latency | throughput | offload | speculative | prefill`: benchmark scripts (never timed tests)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_bench_parsers(
    sub: argparse._SubParsersAction, add_engine_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    from aioffload.bench import latency, offload, prefill, speculative, throughput

    bench = sub.add_parser("bench", help="benchmarks: latency, throughput, offload, speculative, prefill")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for mod in (latency, throughput, offload, speculative, prefill):
        p = kinds.add_parser(mod.NAME, help=mod.__doc__.splitlines()[0] if mod.__doc__ else None)
        add_engine_args(p)
        mod.add_args(p)
        # Kinds that drive one worker at a time run under --tensor-parallel-size > 1 (cli.py checks).
        p.set_defaults(run=mod.run, tensor_parallel=getattr(mod, "TENSOR_PARALLEL", False))
