"""worker/step_extras.py on given logits: which rows are sampled, scored, processed and masked."""

from __future__ import annotations

import pytest
import torch

from aioffload.worker.inputs import SeqChunk
from aioffload.worker.rejection import verify
from aioffload.worker.sampling import SamplingParams, sample_tokens
from aioffload.worker.step_extras import SeqExtras, run_extras
from tests.fake_masks import EvenOnly, Forced

V = 40
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95)


def raw(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def chunk(n: int = 1, start: int = 5, num_logits: int = 1, targets: tuple[int, ...] = ()) -> SeqChunk:
    return SeqChunk(list(range(10, 10 + n)), start, [0, 1, 2], num_logits, targets)


def test_logprobs_are_the_raw_log_softmax_and_leave_the_tokens_alone() -> None:
    logits = raw(3)
    lsm = logits.log_softmax(-1)
    params = [SAMPLED, SAMPLED, GREEDY]
    extras = [SeqExtras([1], [4, 4], logprobs=3), None, SeqExtras([1], [], logprobs=0)]
    out = run_extras(logits.clone(), [chunk()] * 3, params, [7, 8, 9], [2, 0, 0], extras)
    assert out.token_ids == [[t] for t in sample_tokens(logits.clone(), params, [7, 8, 9], [2, 0, 0])]
    (a,), none, (c,) = out.logprobs
    assert none == []
    assert a.token_id == out.token_ids[0][0] and a.logprob == pytest.approx(float(lsm[0, a.token_id]), abs=1e-6)
    top = lsm[0].topk(3)
    assert [t for t, _ in a.top] == top.indices.tolist()
    assert [v for _, v in a.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert c.top == () and c.token_id == int(logits[2].argmax())


def test_logprobs_are_taken_before_penalties_and_masks() -> None:
    logits = raw(1)
    params = [SamplingParams(temperature=0.0, logit_bias=((3, 100.0),))]
    out = run_extras(logits.clone(), [chunk()], params, [0], [0], [SeqExtras([1], [], logprobs=1)])
    assert out.token_ids == [[3]]  # forced by the bias ...
    (lp,) = out.logprobs[0]
    assert lp.logprob == pytest.approx(float(logits.log_softmax(-1)[0, 3]), abs=1e-6)  # ... scored by the model
    assert lp.top[0][0] == int(logits[0].argmax())


def test_penalties_and_masks_apply_only_to_their_rows() -> None:
    logits = raw(3, seed=1)
    logits[:, 6] = 50.0  # the plain argmax of every row
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0), GREEDY, GREEDY]
    even = EvenOnly(V)
    forced = Forced([9], eos=1)
    extras = [SeqExtras([1], [6] * 30), SeqExtras([1], [], mask=forced), SeqExtras([1], [], mask=even)]
    out = run_extras(logits.clone(), [chunk()] * 3, params, [0, 0, 0], [30, 0, 0], extras)
    assert out.token_ids[0][0] != 6  # 50 - 2 * 30 < the rest
    assert out.token_ids[1] == [9]
    assert out.token_ids[2] == [6]  # even: allowed
    assert forced.accepted == [] and out.logprobs == [[], [], []]  # the engine advances providers, not the worker


def test_prompt_targets_are_scored_at_their_rows_and_only_the_last_row_is_sampled() -> None:
    # chunk 0: the prompt's last chunk (4 tokens, 3 targets: rows 0..2 score, row 3 samples)
    # chunk 1: mid-prompt (2 tokens, 2 targets: both rows score; row 1 also samples, thrown away)
    # chunk 2: a decode token
    logits = raw(7, seed=2)
    lsm = logits.log_softmax(-1)
    chunks = [chunk(4, 0, 4, (11, 12, 13)), chunk(2, 0, 2, (21, 22)), chunk()]
    params = [SamplingParams(temperature=0.0, prompt_logprobs=2), SamplingParams(temperature=0.0, prompt_logprobs=0),
              GREEDY]  # fmt: skip
    extras = [SeqExtras([1], []), SeqExtras([1], []), None]
    out = run_extras(logits.clone(), chunks, params, [0, 0, 0], [0, 0, 0], extras)
    assert out.token_ids == [[int(logits[r].argmax())] for r in (3, 5, 6)]
    assert out.num_proposed == [0, 0, 0]
    p0, p1, p2 = out.prompt_logprobs
    assert [x.token_id for x in p0] == [11, 12, 13] and [x.token_id for x in p1] == [21, 22] and p2 == []
    assert [x.logprob for x in p0] == pytest.approx([float(lsm[r, t]) for r, t in zip((0, 1, 2), (11, 12, 13))])
    assert [x.logprob for x in p1] == pytest.approx([float(lsm[r, t]) for r, t in zip((4, 5), (21, 22))])
    assert [t for t, _ in p0[1].top] == lsm[1].topk(2).indices.tolist() and p1[0].top == ()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED])
def test_speculative_rows_each_get_their_own_logprob(params: SamplingParams) -> None:
    logits = raw(4, seed=3)
    lsm = logits.log_softmax(-1)
    c = SeqChunk([10, 20, 21, 22], 8, [0, 1, 2], num_logits=4)  # proposals 20, 21, 22
    expected = verify(logits.clone(), [[20, 21, 22]], [params], [5], [3])
    out = run_extras(logits.clone(), [c], [params], [5], [3], [SeqExtras([1], [0, 0, 0], logprobs=1)])
    assert out.token_ids == expected and out.num_proposed == [3]
    assert [x.token_id for x in out.logprobs[0]] == expected[0]
    assert [x.logprob for x in out.logprobs[0]] == pytest.approx([float(lsm[j, t]) for j, t in enumerate(expected[0])])


def test_masked_verification_rejects_a_forbidden_proposal() -> None:
    logits = raw(3, seed=4)
    forced = Forced([20, 7], eos=1)
    c = SeqChunk([10, 20, 21], 8, [0, 1, 2], num_logits=3)  # proposals 20 (allowed), 21 (not: 7 is)
    out = run_extras(logits.clone(), [c], [SAMPLED], [5], [0], [SeqExtras([1], [], mask=forced)])
    assert out.token_ids == [[20, 7]]
    assert forced.accepted == []  # the walk over the proposals was rolled back


def test_min_tokens_sees_the_proposals_before_each_row() -> None:
    logits = raw(3, seed=5)
    logits[:, 1] = 50.0  # eos is everyone's argmax
    masked = logits[0].clone()
    masked[1] = float("-inf")
    x = int(masked.argmax())
    p = SamplingParams(temperature=0.0, min_tokens=2)
    c = SeqChunk([10, x, 1], 8, [0, 1, 2], num_logits=3)  # proposals x, eos
    out = run_extras(logits.clone(), [c], [p], [0], [1], [SeqExtras([1], [4], eos_token_ids=(1,))])
    # row 0 samples output 1 (1 out: eos masked, x wins); row 1 output 2 (2 out: eos free again)
    assert out.token_ids == [[x, 1, 1]]
    c = SeqChunk([10, 1], 8, [0, 1, 2], num_logits=2)  # an eos proposal where eos is masked: rejected
    out = run_extras(logits.clone(), [c], [p], [0], [1], [SeqExtras([1], [4], eos_token_ids=(1,))])
    assert out.token_ids == [[x]]
