"""Host cost of filling a CUDA-graph replay's input buffers, per step and per row.

`GraphInputs.fill` (ctypes views over the pinned buffers, no numpy) against the numpy
fill it replaced, at decode batch sizes 1..256 with block tables as long as a context of
`--context` tokens. Pinned buffers when CUDA is available, plain host memory otherwise
(the fill is host work either way). Prints a table last and writes
$OUT/graph_inputs_fill.json (or ./graph_inputs_fill.json).

    python scripts/graph_inputs_fill.py [--context 2048] [--max-us-per-row 3]

Exits 1 when the new fill costs more than --max-us-per-row microseconds per row at any
batch size of 8 or more (smaller batches are dominated by the fixed per-call cost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aioffload.worker.cuda_graphs import GraphInputs
from aioffload.worker.inputs import SeqChunk

BLOCK = 16
TRASH = 0


def numpy_fill(rows_np, tables_np, chunks: Sequence[SeqChunk], bs: int) -> None:  # the replaced code, verbatim
    s = len(chunks)
    for i, c in enumerate(chunks):
        p = c.start
        rows_np[0, i], rows_np[1, i], rows_np[3, i] = c.token_ids[0], p, p + 1
        rows_np[2, i] = c.block_table[p // BLOCK] * BLOCK + p % BLOCK
        tables_np[i, : len(c.block_table)] = c.block_table
    rows_np[0, s:bs], rows_np[1, s:bs], rows_np[2, s:bs], rows_np[3, s:bs] = 0, 0, TRASH, 1


def best_us(fn: Callable[[], None], reps: int) -> float:
    """Best of 5 rounds of `reps` calls, in microseconds per call (least disturbed by other load)."""
    fn()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t) / reps * 1e6)
    return min(rounds)


def chunks_for(bs: int, context: int, rng: random.Random) -> list[SeqChunk]:
    out = []
    for _ in range(bs):
        pos = rng.randrange(context // 2, context)
        table = [rng.randrange(1, 1 << 20) for _ in range(pos // BLOCK + 1)]
        out.append(SeqChunk([rng.randrange(32000)], pos, table))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048, help="context length of the decode rows (default 2048)")
    ap.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--max-us-per-row", type=float, default=3.0)
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    n, max_blocks = max(sizes), -(-args.context // BLOCK)
    pin = torch.cuda.is_available()
    host = GraphInputs(n, max_blocks, pin_memory=pin)
    try:
        import numpy  # noqa: F401  (only for the comparison; the server does not need it)

        rows_np, tables_np = host.rows.numpy(), host.tables.numpy()
    except (ImportError, RuntimeError):
        rows_np = tables_np = None
    rng = random.Random(0)
    results = []
    for bs in sizes:
        chunks = chunks_for(bs, args.context, rng)
        new = best_us(lambda c=chunks, b=bs: host.fill(c, b, BLOCK, TRASH), args.reps)
        old = None
        if rows_np is not None:
            old = best_us(lambda c=chunks, b=bs: numpy_fill(rows_np, tables_np, c, b), args.reps)
        results.append({"batch": bs, "ctypes_us": round(new, 2), "ctypes_us_per_row": round(new / bs, 3),
                        "numpy_us": round(old, 2) if old else None,
                        "ratio_to_numpy": round(new / old, 3) if old else None})  # fmt: skip
    worst = max((r["ctypes_us_per_row"] for r in results if r["batch"] >= 8), default=0.0)
    report = {"context": args.context, "pinned": pin, "torch": torch.__version__, "runs": results,
              "worst_us_per_row_batch_ge_8": worst, "limit_us_per_row": args.max_us_per_row}  # fmt: skip
    out = Path(os.environ.get("OUT", ".")) / "graph_inputs_fill.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"fill of {args.context}-token decode rows ({'pinned' if pin else 'host'} buffers), best of 5 x {args.reps}")
    print(f"{'batch':>6} {'ctypes us':>10} {'us/row':>8} {'numpy us':>10} {'ratio':>6}")
    for r in results:
        print(f"{r['batch']:>6} {r['ctypes_us']:>10} {r['ctypes_us_per_row']:>8} {r['numpy_us'] or '-':>10} "
              f"{r['ratio_to_numpy'] or '-':>6}")  # fmt: skip
    print(f"worst per row at batch >= 8: {worst} us (limit {args.max_us_per_row}); json: {out}")
    return 0 if worst <= args.max_us_per_row else 1


if __name__ == "__main__":
    raise SystemExit(main())
