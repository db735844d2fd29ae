"""Issue 13's sampler fields against the real `aioffload serve`, with the official `openai` client:
logprobs and echo equal log_softmax of a transformers forward (tiny float32 checkpoint, 1e-4), n and
best_of, logit_bias, penalties and min_tokens, and JSON output constrained by 20 schemas (demo model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch
from helpers import wait_for
from server_proc import DEMO, ServerProc, start_server
from test_engine_controls import hf_greedy_with_penalties
from tiny_models import add_word_tokenizer, make_checkpoint

from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.worker.sampling import SamplingParams

TOL = 1e-4
SCHEMAS: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
PROMPT = [1, 5, 9, 33, 7, 100, 3]  # word-tokenizer ids: "w1 w5 w9 ..."
pytestmark = pytest.mark.timeout(300)


def word_ids(tokens: list[str]) -> list[int]:
    return [int(t[1:]) for t in tokens]  # "w17" -> 17


# ---- the tiny float32 checkpoint: logprobs against transformers ----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(add_word_tokenizer(make_checkpoint(tmp_path_factory.mktemp("srvlp"), "llama", seed=11, layers=3)))


@pytest.fixture(scope="module")
def hf(tiny: str) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_server(tiny: str) -> Iterator[ServerProc]:
    with start_server("--max-model-len", "256", "--served-model-name", "tiny", model=tiny) as s:
        yield s


@pytest.fixture(scope="module")
def toai(tiny_server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(hf: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row p is the distribution of the token after position p."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_completion_logprobs(lp: Any, ref: torch.Tensor, first_row: int, ids: list[int], k: int) -> None:
    """Entry i of `lp` is the token ids[i], scored by row first_row + i of ref."""
    for i, (token, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        row = ref[first_row + i]
        assert token == f"w{ids[i]}" and abs(value - float(row[ids[i]])) < TOL
        best = row.topk(k)
        expected = {f"w{t}": float(v) for t, v in zip(best.indices.tolist(), best.values.tolist())}
        expected.setdefault(token, float(row[ids[i]]))  # the chosen token is always among them
        assert top.keys() == expected.keys() and all(abs(top[t] - v) < TOL for t, v in expected.items())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completion_logprobs_equal_transformers(toai: openai.OpenAI, hf: Any, stream: bool, temperature: float) -> None:
    kw: dict[str, Any] = dict(model="tiny", prompt=PROMPT, max_tokens=8, logprobs=5, temperature=temperature,
                              seed=3, extra_body={"ignore_eos": True})  # fmt: skip
    if stream:
        chunks = [c.choices[0] for c in toai.completions.create(stream=True, **kw) if c.choices]
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        lp = type("LP", (), {"tokens": tokens,
                             "token_logprobs": [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs],
                             "top_logprobs": [d for c in chunks if c.logprobs for d in c.logprobs.top_logprobs]})
        offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    else:
        lp = toai.completions.create(**kw).choices[0].logprobs
        offsets = lp.text_offset
    out = word_ids(lp.tokens)
    assert len(out) == 8
    check_completion_logprobs(lp, reference(hf, PROMPT + out), len(PROMPT) - 1, out, 5)
    assert offsets == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_echo_prompt_logprobs_equal_transformers(toai: openai.OpenAI, tiny_server: ServerProc, hf: Any) -> None:
    model = "tiny"
    out = toai.completions.create(model=model, prompt=PROMPT, max_tokens=3, logprobs=2, echo=True, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0]  # fmt: skip
    lp = out.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.tokens[0] == f"w{PROMPT[0]}"
    ids = word_ids(lp.tokens)
    assert ids[: len(PROMPT)] == PROMPT and len(ids) == len(PROMPT) + 3
    tail = type("LP", (), {"tokens": lp.tokens[1:], "token_logprobs": lp.token_logprobs[1:],
                           "top_logprobs": lp.top_logprobs[1:]})  # fmt: skip
    check_completion_logprobs(tail, reference(hf, ids), 0, ids[1:], 2)
    prompt_text = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": PROMPT}).json()
    assert out.text.startswith(prompt_text["prompt"])
    streamed = [c.choices[0] for c in toai.completions.create(model=model, prompt=PROMPT, max_tokens=3, logprobs=2,
                                                              echo=True, temperature=0, stream=True,
                                                              extra_body={"ignore_eos": True})]  # fmt: skip
    assert "".join(c.text for c in streamed) == out.text
    assert streamed[0].text.startswith(prompt_text["prompt"]) and streamed[0].logprobs.token_logprobs[0] is None
    assert [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs] == lp.token_logprobs


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_transformers(toai: openai.OpenAI, tiny_server: ServerProc, hf: Any, stream: bool) -> None:
    messages = [{"role": "user", "content": "w5 w9 w33"}]
    model = "tiny"
    kw: dict[str, Any] = dict(model=model, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3,
                              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    if stream:
        content = [e for c in toai.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content or []]  # fmt: skip
    else:
        content = toai.chat.completions.create(**kw).choices[0].logprobs.content  # type: ignore[union-attr]
    prompt = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    out = word_ids([e.token for e in content])
    assert len(out) == 6
    ref = reference(hf, prompt + out)
    for i, e in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert abs(e.logprob - float(row[out[i]])) < TOL and e.bytes == list(e.token.encode())
        best = row.topk(3)
        assert [t.token for t in e.top_logprobs] == [f"w{t}" for t in best.indices.tolist()]
        assert all(abs(t.logprob - v) < TOL for t, v in zip(e.top_logprobs, best.values.tolist()))


def test_batched_prompts_with_n_are_indexed_prompt_times_n(toai: openai.OpenAI) -> None:
    model = "tiny"
    prompts = [PROMPT, PROMPT[:3]]
    kw: dict[str, Any] = dict(model=model, max_tokens=5, temperature=1.0, seed=9, extra_body={"ignore_eos": True})
    out = toai.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = [toai.completions.create(prompt=p, n=2, **kw) for p in prompts]
    assert [c.text for c in out.choices] == [c.text for a in alone for c in a.choices]
    assert out.usage.prompt_tokens == len(PROMPT) + 3  # once per prompt, not per choice
    assert out.usage.completion_tokens == 4 * 5
    chunks = list(toai.completions.create(prompt=prompts, n=2, stream=True, stream_options={"include_usage": True},
                                          **kw))  # fmt: skip
    for c in out.choices:
        assert "".join(k.choices[0].text for k in chunks if k.choices and k.choices[0].index == c.index) == c.text
    assert chunks[-1].usage == out.usage


# ---- the demo model: n, best_of, biases, penalties, structured output ----


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProc]:
    with start_server("--max-model-len", "1024", "--max-num-seqs", "24", model=DEMO) as s:
        yield s


@pytest.fixture(scope="module")
def oai(demo: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0, timeout=120)


def kv_blocks(server: ServerProc) -> tuple[float, float]:
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    value = lambda name: float(next(x for x in lines if x.startswith(f"aioffload_{name} ")).split()[1])
    return value("kv_blocks_free"), value("kv_blocks_total")


def test_n4_with_a_seed_is_reproducible_distinct_and_frees_every_block(oai: openai.OpenAI, demo: ServerProc) -> None:
    kw: dict[str, Any] = dict(model="demo", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=1234,
                              extra_body={"ignore_eos": True})  # fmt: skip
    first, again = oai.completions.create(n=4, **kw), oai.completions.create(n=4, **kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3] and texts == [c.text for c in again.choices]
    assert len(set(texts)) == 4 and first.usage.completion_tokens == 64
    assert oai.completions.create(**kw).choices[0].text == texts[0]  # choice 0 keeps the request's seed
    chunks = list(oai.completions.create(n=4, stream=True, **kw))  # interleaved: test_http.py checks the order
    assert all(len(c.choices) == 1 for c in chunks)
    assert {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)} == \
        dict(enumerate(texts))
    chat = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is a list?"}], n=4,
                                       max_tokens=8, temperature=1.0, seed=5)  # fmt: skip
    assert len({c.message.content for c in chat.choices}) == 4
    free, total = kv_blocks(demo)
    assert free == total


def test_a_client_that_leaves_n4_mid_stream_frees_every_block(demo: ServerProc) -> None:
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 400, "n": 4, "best_of": 4, "stream": True,
            "temperature": 1.0, "seed": 3, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{demo.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(next(lines).startswith("data: {") for _ in range(12)) >= 6
        free, total = kv_blocks(demo)
        assert free < total  # four sequences hold blocks
    assert wait_for(lambda: kv_blocks(demo)[0] == kv_blocks(demo)[1], timeout=10)


def test_best_of_returns_the_best_by_cumulative_logprob(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="demo", prompt="A list is", max_tokens=10, temperature=1.0, seed=77, logprobs=0,
                              extra_body={"ignore_eos": True})  # fmt: skip
    candidates = oai.completions.create(n=4, **kw).choices  # the same seeds best_of=4 draws its candidates with
    ranked = sorted(candidates, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = oai.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]] and [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 20  # the returned choices' tokens
    no_logprobs = oai.completions.create(model="demo", prompt="A list is", max_tokens=10, temperature=1.0, seed=77,
                                         n=1, best_of=4, extra_body={"ignore_eos": True})  # fmt: skip
    assert no_logprobs.choices[0].text == ranked[0].text and no_logprobs.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(n=1, best_of=2, stream=True, **kw)
    assert e.value.body["param"] == "best_of"  # type: ignore[index]


def test_a_plus_100_logit_bias_forces_its_token(oai: openai.OpenAI, demo: ServerProc) -> None:
    forced = httpx.post(f"{demo.url}/tokenize", json={"prompt": " list", "add_special_tokens": False}).json()["tokens"]
    assert len(forced) == 1
    out = oai.completions.create(model="demo", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=1,
                                 logit_bias={str(forced[0]): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == " list" * 6
    chat = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       logit_bias={str(forced[0]): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.choices[0].message.content == " list" * 4


@pytest.mark.parametrize("penalty", [{"presence_penalty": 1.5}, {"frequency_penalty": 0.7},
                                     {"repetition_penalty": 1.8}])
def test_penalties_follow_their_definitions(oai: openai.OpenAI, demo: ServerProc, penalty: dict[str, float]) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(DEMO)
    prompt = "The list is a list of lists and a list"
    kw: dict[str, Any] = dict(model="demo", prompt=prompt, max_tokens=16, temperature=0)
    plain = oai.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    extra = {k: v for k, v in penalty.items() if k == "repetition_penalty"}
    penalised = oai.completions.create(**kw, **{k: v for k, v in penalty.items() if k not in extra},
                                       extra_body={"ignore_eos": True, **extra}).choices[0].text  # fmt: skip
    expected = hf_greedy_with_penalties(model, tok.encode(prompt), 16, SamplingParams(**penalty))  # type: ignore[arg-type]
    assert penalised == tok.decode(expected) and penalised != plain


def test_min_tokens_holds_eos_back(oai: openai.OpenAI) -> None:
    eos = Tokenizer.from_dir(DEMO).eos_token_ids[0]
    kw: dict[str, Any] = dict(model="demo", prompt="Once upon a time", max_tokens=20, temperature=0,
                              logit_bias={str(eos): 40})  # eos is the argmax everywhere  # fmt: skip
    early = oai.completions.create(**kw)
    held = oai.completions.create(**kw, extra_body={"min_tokens": 5})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens == 1
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6 and held.choices[0].text


def chat_json(oai: openai.OpenAI, schema: dict[str, Any], stream: bool = False) -> tuple[str, str | None]:
    messages = [{"role": "user", "content": f"Return a JSON value for this schema: {json.dumps(schema)[:200]}"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kw: dict[str, Any] = dict(model="demo", messages=messages, max_tokens=400, temperature=0, response_format=fmt)
    if stream:
        chunks = [c.choices[0] for c in oai.chat.completions.create(stream=True, **kw) if c.choices]
        return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    out = oai.chat.completions.create(**kw).choices[0]
    return out.message.content or "", out.finish_reason


def test_every_json_schema_output_validates(oai: openai.OpenAI) -> None:
    assert len(SCHEMAS) == 20
    with ThreadPoolExecutor(8) as pool:  # several at once: their masks are filled in one batch
        results = dict(zip(SCHEMAS, pool.map(lambda s: chat_json(oai, s), SCHEMAS.values())))
    for name, (text, reason) in results.items():
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])  # strict json.loads: no raw control characters
    streamed = chat_json(oai, SCHEMAS["enum_string"], stream=True)
    assert streamed == results["enum_string"]


def test_json_object_and_sampled_schemas(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "A Python dictionary in JSON:"}]
    out = oai.chat.completions.create(model="demo", messages=messages, max_tokens=300, temperature=0,  # type: ignore
                                      response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content or ""), dict)
    # Sampled, three choices each with its own matcher: every one ends and validates (bounded schemas: a
    # sampled walk through an unbounded one, e.g. a number's fraction digits, may stop at max_tokens).
    for name in ("flat_object", "tool_arguments", "matrix"):
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}
        got = oai.chat.completions.create(model="demo", messages=messages, max_tokens=300, temperature=1.0, seed=4,  # type: ignore
                                          n=3, response_format=fmt)  # fmt: skip
        texts = [c.message.content or "" for c in got.choices]
        assert all(c.finish_reason == "stop" for c in got.choices), texts
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        assert len(set(texts)) > 1, texts  # sampled: the choices differ


def test_a_schema_llguidance_rejects_is_a_400(oai: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                    response_format=fmt)  # type: ignore[arg-type]
    assert e.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
