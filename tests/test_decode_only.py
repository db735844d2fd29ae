"""build_inputs marks decode-only steps (one token and one logits row per sequence), where the
model skips its last-row gathers; the CUDA-graph decode runner marks its steps the same way."""

from __future__ import annotations

import torch

from aioffload.worker.inputs import SeqChunk, build_inputs

CPU = torch.device("cpu")


def test_only_decode_only_steps_are_marked() -> None:
    decode = build_inputs([SeqChunk([5], 3, [1]), SeqChunk([6], 0, [2])], 16, CPU).meta
    prefill = build_inputs([SeqChunk([5], 3, [1]), SeqChunk([6, 7], 0, [2])], 16, CPU).meta
    verify = build_inputs([SeqChunk([5, 8], 3, [1], num_logits=2)], 16, CPU).meta
    assert decode.decode_only and decode.last_token_idx.tolist() == [0, 1]
    assert not prefill.decode_only and not verify.decode_only
