"""What one `Worker.execute` step hands back: per chunk, the tokens it emitted."""

from __future__ import annotations

from dataclasses import dataclass

from aioffload.worker.logprobs import TokenLogprob


@dataclass
class StepOutput:
    """Per chunk, in the order of the step's chunks.

    `token_ids[i]` is the accepted prefix of chunk i's proposals followed by one token sampled from
    the target (a plain chunk: that one token). Callers ignore the entries of chunks still mid-prefill.
    """

    token_ids: list[list[int]]
    num_proposed: list[int]  # proposals verified per chunk (0 for a plain chunk)
    # Only from steps that ran worker/step_extras.py (else None). Per chunk: one entry per emitted token
    # where its SeqExtras asked for logprobs, [] elsewhere; and one per prompt target of the chunk.
    logprobs: list[list[TokenLogprob]] | None = None
    prompt_logprobs: list[list[TokenLogprob]] | None = None
