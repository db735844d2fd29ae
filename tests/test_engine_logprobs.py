"""Logprobs and prompt logprobs through Engine.generate against a transformers forward (float32, 1e-4):
chunked prefill, the prompt-row cap, preemption, speculative verification, concurrency, a lagging reader."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aioffload.config import DEMO_MODEL
from aioffload.engine.outputs import RequestOutput
from aioffload.engine.request_state import OutputSlot
from aioffload.worker.logprobs import TokenLogprob
from aioffload.worker.sampling import SamplingParams
from tests.helpers import make_cpu_engine as make
from tests.helpers import run_jobs as run
from tests.tiny_models import add_word_tokenizer, make_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("lp"), "llama", seed=11, layers=3)))


@pytest.fixture(scope="module")
def hf(tiny: str):  # noqa: ANN201
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()




def reference(hf, prompt: list[int], output: list[int]) -> torch.Tensor:  # noqa: ANN001
    """log_softmax of transformers' logits over prompt + output: row p = the token after position p."""
    with torch.no_grad():
        return hf(torch.tensor([prompt + output])).logits[0].float().log_softmax(-1)


def check(got: TokenLogprob, ref_row: torch.Tensor, num_top: int) -> None:
    assert abs(got.logprob - float(ref_row[got.token_id])) < TOL
    assert len(got.top) == num_top
    top = ref_row.topk(num_top)
    assert [t for t, _ in got.top] == top.indices.tolist()
    assert max((abs(v - r) for (_, v), r in zip(got.top, top.values.tolist())), default=0.0) < TOL


def joined(outs: list[RequestOutput]) -> tuple[list[int], list[TokenLogprob], list[TokenLogprob | None] | None]:
    ids = [t for o in outs for t in o.token_ids]
    lps = [x for o in outs for x in (o.logprobs or [])]
    assert all(o.prompt_logprobs is None for o in outs[1:])  # the first output carries them, once
    return ids, lps, outs[0].prompt_logprobs


def check_request(hf, prompt: list[int], p: SamplingParams, outs: list[RequestOutput]) -> None:  # noqa: ANN001
    ids, lps, prompt_lps = joined(outs)
    ref = reference(hf, prompt, ids)
    if p.logprobs is not None:
        assert [x.token_id for x in lps] == ids
        for i, x in enumerate(lps):
            check(x, ref[len(prompt) - 1 + i], p.logprobs)
        assert outs[-1].cumulative_logprob == pytest.approx(sum(x.logprob for x in lps), abs=1e-5)
    else:
        assert lps == [] and all(o.logprobs is None for o in outs)
    if p.prompt_logprobs is not None:
        assert prompt_lps is not None and len(prompt_lps) == len(prompt) and prompt_lps[0] is None
        for j in range(1, len(prompt)):
            x = prompt_lps[j]
            assert x is not None and x.token_id == prompt[j]
            check(x, ref[j - 1], p.prompt_logprobs)
    else:
        assert prompt_lps is None


PROMPT = [1, 5, 9, 33, 7, 100, 3, 44, 45, 46, 200, 17, 18, 19, 77, 78, 79, 80, 81, 82, 9]  # 21 tokens


@pytest.mark.parametrize("budget,seqs", [(64, 16), (5, 16), (64, 3)], ids=["whole", "chunked", "row-cap"])
def test_logprobs_and_prompt_logprobs_equal_transformers(tiny: str, hf, budget: int, seqs: int) -> None:  # noqa: ANN001
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    engine = make(tiny, budget=budget, seqs=seqs)
    (outs,) = run(engine, [(PROMPT, p)])
    check_request(hf, PROMPT, p, outs)
    assert len([t for o in outs for t in o.token_ids]) == 8


def test_sampled_logprobs_are_of_the_raw_distribution(tiny: str, hf) -> None:  # noqa: ANN001
    p = SamplingParams(max_tokens=10, temperature=1.7, top_k=4, seed=3, ignore_eos=True, logprobs=2)
    (outs,) = run(make(tiny), [(PROMPT, p)])
    check_request(hf, PROMPT, p, outs)


def test_logprobs_do_not_change_tokens_and_mix_with_plain_requests(tiny: str, hf) -> None:  # noqa: ANN001
    prompts = [PROMPT[: 4 + 3 * i] for i in range(6)]
    base = [SamplingParams(max_tokens=9, temperature=0.9, seed=i, ignore_eos=True) for i in range(6)]
    asked = [SamplingParams(max_tokens=9, temperature=0.9, seed=i, ignore_eos=True, logprobs=i % 3,
                            prompt_logprobs=1 if i % 2 else None) if i % 3 else base[i] for i in range(6)]  # fmt: skip
    plain = run(make(tiny), list(zip(prompts, base)))
    mixed = run(make(tiny), list(zip(prompts, asked)))
    for pr, p, a, b in zip(prompts, asked, plain, mixed):
        assert [t for o in a for t in o.token_ids] == [t for o in b for t in o.token_ids]
        check_request(hf, pr, p, b)


def test_prompt_logprobs_after_preemption_are_delivered_once(tiny: str, hf) -> None:  # noqa: ANN001
    prompts = [PROMPT[: 14 + i % 7] for i in range(8)]
    ps = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
          for _ in prompts]  # fmt: skip
    engine = make(tiny, num_blocks=33, budget=6)  # 132 tokens for 8 x ~47: preemptions, mid-prefill ones too
    seen: list[tuple[str, int, int]] = []
    original = engine.scheduler._preempt

    def spy(request):  # noqa: ANN001, ANN202
        seen.append((request.request_id, request.num_computed_tokens, len(request.output_token_ids)))
        return original(request)

    engine.scheduler._preempt = spy  # type: ignore[method-assign]
    outs = run(engine, list(zip(prompts, ps)))
    assert any(n_out == 0 and computed > 0 for _, computed, n_out in seen), "no preemption mid-prefill"
    for pr, p, o in zip(prompts, ps, outs):
        check_request(hf, pr, p, o)


def test_speculative_logprobs_come_from_each_accepted_tokens_own_row(tiny: str, hf) -> None:  # noqa: ANN001
    loop = [1, 40, 41, 42, 43] * 4  # prompt lookup proposes the loop; a random model accepts some
    p = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)
    engine = make(tiny, spec="ngram")
    (outs,) = run(engine, [(loop, p)])
    (plain,) = run(make(tiny), [(loop, p)])
    assert [t for o in outs for t in o.token_ids] == [t for o in plain for t in o.token_ids]
    assert engine.stats()["spec_accepted_tokens_total"] > 0  # some tokens came from proposal rows
    check_request(hf, loop, p, outs)


def test_slot_merges_logprobs_when_the_reader_lags() -> None:
    slot = OutputSlot()
    a, b, c = (TokenLogprob(t, -float(t)) for t in (4, 5, 6))
    slot.put(RequestOutput("r", "x", [4], logprobs=[a], prompt_logprobs=[None, a], cumulative_logprob=-4.0))
    slot.put(RequestOutput("r", "y", [5], logprobs=[b], cumulative_logprob=-9.0))
    slot.put(RequestOutput("r", "z", [6], logprobs=[c], cumulative_logprob=-15.0, finished=True, finish_reason="stop"))
    out = asyncio.run(slot.get())
    assert (out.text, out.token_ids, out.logprobs, out.prompt_logprobs) == ("xyz", [4, 5, 6], [a, b, c], [None, a])
    assert out.cumulative_logprob == -15.0 and out.finished and out.finish_reason == "stop"


def test_demo_model_echo_of_a_text_prompt() -> None:
    demo = DEMO_MODEL
    p = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    engine = make(demo)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    (outs,) = run(engine, [(ids, p)])
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(demo, torch_dtype=torch.float32).eval()
    check_request(model, ids, p, outs)
