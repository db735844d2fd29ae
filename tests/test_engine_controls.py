"""Sampling controls and logits masks through Engine.generate: logit_bias forces, min_tokens delays eos,
penalties follow their definitions against a transformers greedy loop, mask providers constrain and end
outputs (with speculative verification and n > 1 too)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aioffload.config import DEMO_MODEL, CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from aioffload.engine.async_engine import Engine
from aioffload.engine.outputs import RequestOutput
from aioffload.worker.sampling import SamplingParams
from tests.fake_masks import EvenOnly, Forced
from tests.helpers import make_cpu_engine as make
from tests.helpers import run_jobs as run
from tests.tiny_models import add_word_tokenizer, make_checkpoint

DEMO = DEMO_MODEL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("ctl"), "llama", seed=13, layers=3)))




def tokens(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.token_ids]


def test_a_plus_100_bias_forces_its_token_on_the_demo_model() -> None:
    engine = make(DEMO)
    forced = 1234
    jobs = [("Once upon a time", SamplingParams(max_tokens=8, temperature=t, seed=3, ignore_eos=True,
                                                logit_bias=((forced, 100.0),))) for t in (0.0, 1.0, 1.5)]  # fmt: skip
    jobs.append(("Once upon a time", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
    outs = run(engine, jobs)
    assert [tokens(o) for o in outs[:3]] == [[forced] * 8] * 3
    assert forced not in tokens(outs[3])  # the unbiased request in the same batches is its own


def test_min_tokens_delays_eos_on_the_demo_model() -> None:
    engine = make(DEMO)
    eos = engine.eos_token_ids[0]
    push = ((eos, 40.0),)  # eos becomes the argmax everywhere
    early, late, stop_id = run(engine, [
        ("Once upon a time", SamplingParams(max_tokens=20, temperature=0.0, logit_bias=push)),
        ("Once upon a time", SamplingParams(max_tokens=20, temperature=0.0, logit_bias=push, min_tokens=5)),
        ("Once upon a time", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, min_tokens=4,
                                            stop_token_ids=(77,), logit_bias=((77, 40.0),))),
    ])  # fmt: skip
    assert tokens(early) == [eos] and early[-1].finish_reason == "stop"
    late_ids = tokens(late)
    assert len(late_ids) == 6 and late_ids[-1] == eos and eos not in late_ids[:5] and late[-1].finish_reason == "stop"
    assert len(tokens(stop_id)) == 5 and tokens(stop_id)[-1] == 77 and 77 not in tokens(stop_id)[:4]


def test_min_tokens_holds_stop_strings_back_too(tiny: str) -> None:
    engine = make(tiny)
    plain = run(engine, [([1, 5, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))])[0]
    word = engine.tokenizer.decode([tokens(plain)[0]])
    stop = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=(word,))
    cut, held = run(engine, [([1, 5, 9], stop), ([1, 5, 9], SamplingParams(**{**stop.__dict__, "min_tokens": 3}))])
    assert len(tokens(cut)) == 1 and word not in "".join(o.text for o in cut) and cut[-1].finish_reason == "stop"
    assert tokens(held)[:3] == tokens(plain)[:3]  # the stop string at token 1 did not end it
    assert word in "".join(o.text for o in held)


def hf_greedy_with_penalties(model, prompt: list[int], n: int, p: SamplingParams) -> list[int]:  # noqa: ANN001
    """The definitions, written out on transformers' logits, one greedy token at a time."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float().clone()
            for t in set(prompt + out):
                v = float(logits[t])
                logits[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
            for t in set(out):
                logits[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
            for t, b in p.logit_bias:
                logits[t] += b
            out.append(int(logits.argmax()))
    return out


PENALTIES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "repetition": dict(repetition_penalty=1.8),
    "all": dict(presence_penalty=-0.5, frequency_penalty=0.4, repetition_penalty=1.3, logit_bias=((17, 2.0),)),
}


@pytest.mark.parametrize("spec", ["off", "ngram"])
def test_penalised_greedy_output_follows_the_definitions(tiny: str, spec: str) -> None:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    prompt = [1, 40, 41, 42, 43, 40, 41, 42, 43, 40, 41]
    ps = {k: SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, **kw) for k, kw in PENALTIES.items()}  # type: ignore[arg-type]
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = run(make(tiny, spec=spec), [(prompt, p) for p in ps.values()] + [(prompt, plain)])
    for (name, p), o in zip(ps.items(), outs):
        assert tokens(o) == hf_greedy_with_penalties(model, prompt, 16, p), name
        assert tokens(o) != tokens(outs[-1]), f"{name} changed nothing: a weak test"
    assert tokens(outs[-1]) == hf_greedy_with_penalties(model, prompt, 16, plain)


@pytest.mark.parametrize("spec", ["off", "ngram"])
def test_an_even_only_mask_constrains_every_token(tiny: str, spec: str) -> None:
    made: list[EvenOnly] = []

    def factory() -> EvenOnly:
        made.append(EvenOnly(256))
        return made[-1]

    loop = [1, 40, 42, 44, 46] * 4  # prompt lookup proposes even tokens: some are verified and accepted
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logits_mask=factory)
    hot = SamplingParams(max_tokens=20, temperature=1.5, seed=2, ignore_eos=True, logits_mask=factory, n=2)
    engine = make(tiny, spec=spec)
    g, h = run(engine, [(loop, greedy), (loop, hot)])
    assert len(made) == 3  # one provider per sequence: the request, and each of the two choices
    for outs, idx in ((g, 0), (h, 0), (h, 1)):
        assert len(tokens(outs, idx)) == 20 and all(t % 2 == 0 for t in tokens(outs, idx))
    # each provider advanced on its own tokens, all but the last (the request ended there: no next mask)
    assert sorted(m.accepted for m in made) == sorted([tokens(g)[:-1], tokens(h, 0)[:-1], tokens(h, 1)[:-1]])
    if spec == "ngram":
        assert engine.stats()["spec_accepted_tokens_total"] > 0
        assert tokens(g) == tokens(run(make(tiny), [(loop, greedy)])[0])  # same text as without speculation


@pytest.mark.parametrize("finish_on_eos", [False, True])
def test_a_forced_sequence_then_eos(tiny: str, finish_on_eos: bool) -> None:
    seq = [7, 8, 9, 200, 201]
    engine = make(tiny)
    eos = engine.eos_token_ids[0]
    p = SamplingParams(max_tokens=30, temperature=1.0, seed=1, logits_mask=lambda: Forced(seq, eos, finish_on_eos))
    (outs,) = run(engine, [([1, 5, 9], p)])
    # a finished provider ends the request at once; one that wants eos first gets it sampled (the only id left)
    assert tokens(outs) == (seq + [eos] if finish_on_eos else seq)
    assert outs[-1].finish_reason == "stop" and outs[-1].finished


def test_a_mask_factory_that_raises_fails_only_its_request(tiny: str) -> None:
    engine = make(tiny)

    def broken() -> EvenOnly:
        raise ValueError("response_format: cannot compile")

    async def main() -> list[int]:
        with pytest.raises(ValueError, match="^response_format: cannot compile"):
            async for _ in engine.generate([1, 2], SamplingParams(logits_mask=broken), "bad"):
                pass
        return [t async for o in engine.generate([1, 2], SamplingParams(max_tokens=3), "good") for t in o.token_ids]

    assert len(asyncio.run(main())) == 3
    assert not engine._states and engine.block_manager.pool.num_free == engine.block_manager.pool.num_blocks


def test_a_draft_model_with_penalties_logprobs_and_masks(tiny: str) -> None:
    """The tiny model drafting for itself: its proposals ignore the penalties and the mask, so the
    target's processed rows reject some; the text and the logprobs stay those of a run without it."""
    cfg = EngineConfig(
        model=tiny, device="cpu",
        cache=CacheConfig(num_blocks=256, block_size=4),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=16),
        speculative=SpeculativeConfig(method="draft", draft_model=tiny, num_tokens=4),
    ).validate()  # fmt: skip
    drafted = Engine.from_config(cfg)
    drafted.speculation.draft_step_s = 0.0  # type: ignore[union-attr]
    jobs = [
        ([1, 5, 9, 33], SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, frequency_penalty=1.0,
                                       logprobs=2, prompt_logprobs=1)),
        ([1, 5, 9, 33], SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True,
                                       logits_mask=lambda: EvenOnly(256))),
        ([1, 7, 7], SamplingParams(max_tokens=14, temperature=0.8, seed=4, ignore_eos=True, logprobs=0)),
    ]  # fmt: skip
    with_draft = run(drafted, jobs)
    without = run(make(tiny), jobs)
    assert drafted.stats()["spec_accepted_tokens_total"] > 0
    for a, b in zip(with_draft, without):
        assert tokens(a) == tokens(b)
        la = [x for o in a for x in o.logprobs or []]
        lb = [x for o in b for x in o.logprobs or []]
        assert [x.token_id for x in la] == [x.token_id for x in lb]
        assert [x.logprob for x in la] == pytest.approx([x.logprob for x in lb], abs=1e-5)
        pa, pb = a[0].prompt_logprobs or [None], b[0].prompt_logprobs or [None]
        assert [x.token_id for x in pa[1:]] == [x.token_id for x in pb[1:]]  # type: ignore[union-attr]
        assert [x.logprob for x in pa[1:]] == pytest.approx([x.logprob for x in pb[1:]], abs=1e-5)  # type: ignore[union-attr]


def test_kept_special_tokens_show_in_the_text_but_finishing_ids_do_not() -> None:
    """SamplingParams.skip_special_tokens=False (tool-parsing requests): special tokens stay in the
    engine's text, eos and stop_token_ids do not, and stop strings still wait for min_tokens."""
    from aioffload.checkpoint.tokenizer import Tokenizer
    from aioffload.engine.request import Request
    from aioffload.engine.request_state import OutputSlot, RequestState

    tok = Tokenizer.from_dir(DEMO)  # 0 <|bos|>, 1 <|eos|>, 2 <|user|>, 3 <|assistant|>
    words = tok.encode(" hello world", add_special_tokens=False)

    def text(params: SamplingParams, ids: list[int]) -> str:
        st = RequestState(Request("r", [5], params, eos_token_ids=(1,)), OutputSlot(), tok, [5], "r", 0)
        outs = [st.on_token(t) for t in ids]
        return "".join(o.text for o in outs if o is not None) + st.close(None, "stop").text

    ids = [2, *words, 3, 1]
    assert text(SamplingParams(max_tokens=20), ids) == " hello world"
    kept = SamplingParams(max_tokens=20, skip_special_tokens=False, stop_token_ids=(3,))
    assert text(kept, ids) == "<|user|> hello world"  # <|assistant|> (a stop id) and <|eos|> left out
    late = SamplingParams(max_tokens=20, skip_special_tokens=False, stop=("world",), min_tokens=len(ids))
    assert text(late, ids) == "<|user|> hello world<|assistant|>"  # no stop string before min_tokens
