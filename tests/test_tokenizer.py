"""Tokenizer tests on tiny real tokenizers trained here: byte-level BPE (Llama-3 / Qwen style) and
SentencePiece-style BPE with byte fallback (Llama-2 style)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from aioffload.checkpoint.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A model streams its weights to the GPU every step.",
    "Hello world, hello again: the tokenizer learns merges from these few paragraphs of text.",
    "Grüße aus Köln! Ça va très bien, merci. Naïve café, déjà vu, señor, über, Ünïcödé.",
    "日本語のテキストを少し書きます。東京は大きな都市です。中文也可以。",
    "Emoji too: 🚀 launches, 🎉 parties, 👨‍👩‍👧 families, and — dashes — everywhere.",
]
MULTILINGUAL = "Hello wörld — 日本語のテキスト 🚀🎉 naïve café, Ünïcödé! 👨‍👩‍👧"

# Llama-3's template as shipped in its tokenizer_config.json (raw: jinja sees the '\n' escapes).
LLAMA3_TEMPLATE = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r" + message['content'] | trim + '<|eot_id|>' %}"
    r"{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2's ChatML template.
CHATML_TEMPLATE = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Multi-line and indented: only renders like HF with trim_blocks + lstrip_blocks.
INDENTED_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'system' %}
[SYS] {{ message['content'] }}
    {% else %}
<{{ message['role'] }}> {{ message['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<assistant>
{%- endif %}"""
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there! "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Grüße 🚀"},
]


def _write(
    folder: Path, hf: HFTokenizer, config: dict[str, Any], gen_config: dict[str, Any] | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if gen_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen_config))
    return folder


@pytest.fixture(scope="module")
def byte_level_hf() -> HFTokenizer:
    """Llama-3 layout: ByteLevel pre-tokenizer and decoder, post-processor adds <|begin_of_text|>."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,  # small: most multi-byte characters stay split over several tokens
        special_tokens=LLAMA3_SPECIALS + CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(CORPUS * 3, trainer)
    bos_id = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
            ),
        ]
    )
    return hf


def _metaspace_hf(with_post_processor: bool) -> HFTokenizer:
    """Llama-2 layout: `▁` word prefix, BPE with <0xXX> byte fallback, SentencePiece-like decoder."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70, show_progress=False
    )
    hf.train_from_iterator(CORPUS[:3] * 3, trainer)  # no CJK or emoji in the vocab: they go to bytes
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # SentencePiece keeps the 256 byte tokens in the vocab
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    hf = HFTokenizer.from_str(json.dumps(data))
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    if with_post_processor:
        hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return hf


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory, byte_level_hf: HFTokenizer) -> Path:
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    gen = {
        "eos_token_id": [
            byte_level_hf.token_to_id("<|end_of_text|>"),
            byte_level_hf.token_to_id("<|eot_id|>"),
        ]
    }
    return _write(tmp_path_factory.mktemp("llama3"), byte_level_hf, config, gen)


@pytest.fixture(scope="module")
def llama3(llama3_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(llama3_dir)


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": True}
    return _write(tmp_path_factory.mktemp("llama2"), _metaspace_hf(with_post_processor=True), config)


@pytest.fixture(scope="module")
def llama2(llama2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(llama2_dir)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("which", ["llama3", "llama2"])
def test_streaming_reassembles_exact_decode(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    # The test only means something if some tokens hold part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == MULTILINGUAL
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing left to flush: the text ended on a whole character


def test_streaming_with_prompt_prefix_byte_level(llama3: Tokenizer) -> None:
    prompt_ids = llama3.encode("Tell me: ")
    output_ids = llama3.encode(MULTILINGUAL + " the end", add_special_tokens=False)
    deltas = _stream(IncrementalDetokenizer(llama3, prompt_ids), output_ids)
    assert "".join(deltas) == llama3.decode(output_ids)
    assert not any("\ufffd" in d for d in deltas)


def test_streaming_keeps_leading_spaces_sentencepiece(llama2: Tokenizer) -> None:
    prompt_ids = llama2.encode("Hello")  # [<s>, ▁Hello...]
    all_ids = llama2.encode("Hello world, naïve café 🚀 déjà vu", add_special_tokens=False)
    assert all_ids[: len(prompt_ids) - 1] == prompt_ids[1:]
    output_ids = all_ids[len(prompt_ids) - 1 :]
    full = llama2.decode(prompt_ids + output_ids)
    deltas = _stream(IncrementalDetokenizer(llama2, prompt_ids), output_ids)
    # The deltas continue the prompt's text: the space before "world" is kept, which decoding the
    # output ids alone would strip.
    assert "".join(deltas) == full[len(llama2.decode(prompt_ids)) :] == " world, naïve café 🚀 déjà vu"
    assert not any("\ufffd" in d for d in deltas)
    # Without a prompt: every `▁` token after the first brings its space, though decoding it alone would not.
    ids = llama2.encode("the lazy dog jumps over", add_special_tokens=False)
    pieces = [llama2._hf.id_to_token(i) for i in ids]
    deltas = _stream(IncrementalDetokenizer(llama2), ids)
    assert "".join(deltas) == "the lazy dog jumps over"
    starts = [k for k, piece in enumerate(pieces) if piece.startswith("▁")][1:]
    assert len(starts) == 4 and all(
        deltas[k].startswith(" ") and llama2.decode([ids[k]])[0] != " " for k in starts
    )


def test_streaming_special_tokens(llama3: Tokenizer) -> None:
    ids = llama3.encode("hi<|eot_id|> there", add_special_tokens=False)
    assert "".join(_stream(IncrementalDetokenizer(llama3), ids)) == "hi there"
    kept = _stream(IncrementalDetokenizer(llama3, skip_special_tokens=False), ids)
    assert "".join(kept) == "hi<|eot_id|> there"


def test_flush_emits_incomplete_character(llama3: Tokenizer) -> None:
    ids = llama3.encode("ok 🚀", add_special_tokens=False)
    detok = IncrementalDetokenizer(llama3)
    held = "".join(detok.push(i) for i in ids[:-1])  # the rocket's last byte never comes
    flushed = detok.flush()
    assert held.rstrip() == "ok" and flushed.endswith("\ufffd")
    assert held + flushed == detok.text == llama3.decode(ids[:-1])


def test_single_bos(llama3: Tokenizer, llama2: Tokenizer, tmp_path: Path) -> None:
    bos3 = llama3.bos_token_id
    assert llama3.encode("") == [bos3]
    assert llama3.encode("hi")[:2].count(bos3) == 1  # post-processor adds it; we must not add it again
    assert bos3 not in llama3.encode("hi", add_special_tokens=False)
    assert llama2.bos_token_id == 1 and llama2.encode("hi")[:2].count(1) == 1
    # Without a post-processor, add_bos_token makes us prepend it ourselves.
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    bare = Tokenizer.from_dir(_write(tmp_path / "bare", _metaspace_hf(with_post_processor=False), config))
    assert bare.encode("hi")[0] == 1 and bare.encode("hi")[1] != 1
    assert bare.encode("hi", add_special_tokens=False) == bare.encode("hi")[1:]
    # add_bos_token false (or absent): no BOS unless the post-processor adds one.
    no_bos = Tokenizer.from_dir(_write(tmp_path / "no_bos", _metaspace_hf(False), {"bos_token": "<s>"}))
    assert no_bos.bos_token_id == 1 and 1 not in no_bos.encode("hi")


def test_llama3_chat_template(llama3: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "}]
    body = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    )
    assert llama3.apply_chat_template(msgs, add_generation_prompt=False) == body
    assert llama3.apply_chat_template(msgs) == body + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = llama3.encode(llama3.apply_chat_template(msgs), add_special_tokens=False)
    assert ids.count(llama3.bos_token_id) == 1 and ids[0] == llama3.bos_token_id


@pytest.mark.parametrize("as_list", [False, True])
def test_chatml_chat_template(as_list: bool, byte_level_hf: HFTokenizer, tmp_path: Path) -> None:
    template: Any = CHATML_TEMPLATE
    if as_list:  # the named-templates form: serve "default"
        template = [
            {"name": "tool_use", "template": "{{ raise_exception('wrong one') }}"},
            {"name": "default", "template": CHATML_TEMPLATE},
        ]
    tok = Tokenizer.from_dir(
        _write(tmp_path, byte_level_hf, {"eos_token": "<|im_end|>", "chat_template": template})
    )
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    body = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == body
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == body + "<|im_start|>assistant\n"
    assert tok.bos_token_id is None and tok.eos_token_ids == (byte_level_hf.token_to_id("<|im_end|>"),)


def test_fallback_chat_template(byte_level_hf: HFTokenizer, tmp_path: Path) -> None:
    byte_level_hf.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json at all
    tok = Tokenizer.from_dir(tmp_path)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "system: S\nuser: Hi\nassistant:"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "system: S\nuser: Hi\n"
    assert tok.eos_token_ids == () and tok.bos_token_id is None
    assert tok.vocab_size == byte_level_hf.get_vocab_size(with_added_tokens=True) == 420


@pytest.mark.parametrize("gen_eos", ["list", "int", "none"])
def test_eos_ids_merged(gen_eos: str, byte_level_hf: HFTokenizer, tmp_path: Path) -> None:
    eot, end, im_end = (byte_level_hf.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>"))
    gen = {"list": {"eos_token_id": [eot, end]}, "int": {"eos_token_id": eot}, "none": {}}[gen_eos]
    tok = Tokenizer.from_dir(_write(tmp_path, byte_level_hf, {"eos_token": {"content": "<|im_end|>"}}, gen))
    expected = {"list": (eot, end, im_end), "int": (eot, im_end), "none": (im_end,)}[gen_eos]
    assert tok.eos_token_ids == expected
    # An eos listed in both places appears once.
    tok = Tokenizer.from_dir(_write(tmp_path / "dup", byte_level_hf, {"eos_token": "<|eot_id|>"}, gen))
    assert tok.eos_token_ids == {"list": (eot, end), "int": (eot,), "none": (eot,)}[gen_eos]


def test_errors_name_the_file(byte_level_hf: HFTokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no_such_model"):
        Tokenizer.from_dir(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_bytes(b"\x00\xff\xfegarbage{[")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path / "corrupt")
    bad_config = _write(tmp_path / "bad_config", byte_level_hf, {})
    (bad_config / "tokenizer_config.json").write_bytes(b"{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(bad_config)
    broken = _write(tmp_path / "broken", byte_level_hf, {"chat_template": "{% for m in messages %}{{ m }"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat template does not compile"):
        Tokenizer.from_dir(broken)
    raising = _write(
        tmp_path / "raising", byte_level_hf, {"chat_template": "{{ raise_exception('no system') }}"}
    )
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat template failed: no system"):
        Tokenizer.from_dir(raising).apply_chat_template(MESSAGES)


def test_matches_transformers(llama3_dir: Path, llama2_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    texts = [MULTILINGUAL, "Hello world", " leading space", "a<|eot_id|>b", ""]
    for source, template in [(llama3_dir, LLAMA3_TEMPLATE), (llama2_dir, INDENTED_TEMPLATE)]:
        folder = tmp_path / source.name
        shutil.copytree(source, folder)
        tok = Tokenizer.from_dir(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        ref = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            bos_token=tok._bos_token,
            eos_token=tok._eos_token,
            clean_up_tokenization_spaces=False,
        )
        ref.chat_template = template
        for text in texts:
            ids = tok.encode(text)
            assert ids == ref.encode(text), (folder, text)
            assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
            assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        ours = Tokenizer.from_dir(folder)
        for add_generation_prompt in (True, False):
            expected = ref.apply_chat_template(
                MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours.apply_chat_template(MESSAGES, add_generation_prompt) == expected


def test_long_stream_window_stays_bounded(llama3: Tokenizer) -> None:
    text = " ".join([MULTILINGUAL] * 8)
    ids = llama3.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(llama3, prompt_token_ids=llama3.encode("x" * 50))
    longest = 0
    for i in ids:
        detok.push(i)
        longest = max(longest, len(detok._ids))  # tokens kept for the decode window
    assert len(ids) > 300 and longest < 100  # O(1) per token: old tokens are dropped
    assert detok.text + detok.flush() == text


QWEN25_TEMPLATE = (Path(__file__).parent / "data" / "qwen2_5_chat_template.jinja").read_text()
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "21 C, sunny", "tool_call_id": "call_1"},
]  # fmt: skip


def test_tools_rendered_like_transformers(byte_level_hf: HFTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _write(tmp_path, byte_level_hf, {"eos_token": "<|im_end|>", "chat_template": QWEN25_TEMPLATE})
    tok = Tokenizer.from_dir(folder)
    assert tok.template_uses_tools and tok.chat_template == QWEN25_TEMPLATE
    ours = tok.apply_chat_template(TOOL_MESSAGES, add_generation_prompt=True, tools=[WEATHER_TOOL])
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>")
    ref.chat_template = QWEN25_TEMPLATE
    theirs = ref.apply_chat_template(TOOL_MESSAGES, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert json.dumps(WEATHER_TOOL) in ours and '{"name": "get_weather", "arguments": {"city": "Paris"}}' in ours
    assert "<tool_response>\n21 C, sunny\n</tool_response>" in ours
    without = tok.apply_chat_template(TOOL_MESSAGES[:1], add_generation_prompt=True)
    assert "<tools>" not in without  # tools=None: the template's plain branch


def test_template_uses_tools(llama3: Tokenizer) -> None:
    assert not llama3.template_uses_tools  # Llama-3's 8B template above never reads `tools`
    assert json.loads(llama3.to_json())["model"]["type"] == "BPE"
