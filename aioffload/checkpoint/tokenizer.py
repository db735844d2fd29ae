"""Tokenizer, chat templates and incremental detokenization for a Hugging Face model folder.

Reads tokenizer.json with the `tokenizers` library (no `transformers` at run time), the chat
template and special tokens from tokenizer_config.json, and the eos ids from generation_config.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# Used when the model ships no chat template: "<role>: content" lines, then "assistant:".
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# How many already-emitted prompt tokens the detokenizer decodes as context (vLLM uses 5): enough
# for a decoder to see the word boundary before the first output token.
_PROMPT_CONTEXT_TOKENS = 5


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable, or a chat template failed; the message names the file."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """bos_token / eos_token are a plain string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """chat_template is a string, or a list of {name, template} of which we serve "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # HF overrides jinja's tojson: no HTML escaping, non-ASCII kept, so tool schemas render verbatim.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A model's tokenizer. Build with `Tokenizer.from_dir(model_dir)`."""

    def __init__(
        self,
        hf: HFTokenizer,
        template_source: str,
        template_file: Path,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self._hf = hf
        self._template, template_vars = _compile_template(template_source, template_file)
        self._template_file = template_file  # named in render errors
        self.chat_template = template_source
        self.template_uses_tools = "tools" in template_vars  # a template that never reads tools cannot show them
        self._bos_token = bos_token
        self._eos_token = eos_token
        self.bos_token_id: int | None = hf.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        # HF semantics: the tokenizer.json post-processor decides the special tokens; `add_bos_token`
        # only adds a BOS the post-processor does not (Llama-3's post-processor adds <|begin_of_text|>
        # itself, and prepending it again would give a double BOS). Probe once on the empty string.
        post_adds_bos = self.bos_token_id is not None and hf.encode("").ids[:1] == [self.bos_token_id]
        self._prepend_bos = add_bos_token and self.bos_token_id is not None and not post_adds_bos

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a folder (expected tokenizer.json inside)")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file}: missing; the model folder needs a tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for every parse error
            raise TokenizerError(f"{tokenizer_file}: cannot load tokenizer: {e}") from e

        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        gen_file = folder / "generation_config.json"
        gen_config = _read_json(gen_file) if gen_file.is_file() else {}

        bos_token = _token_content(config.get("bos_token"))
        if bos_token is None and isinstance(gen_config.get("bos_token_id"), int):
            bos_token = hf.id_to_token(gen_config["bos_token_id"])
        eos_token = _token_content(config.get("eos_token"))

        # generation_config's list says when generation stops (Llama-3 lists <|eot_id|> there);
        # tokenizer_config's eos_token stays a stop token too.
        gen_eos = gen_config.get("eos_token_id")
        eos_ids = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
        eos_id = hf.token_to_id(eos_token) if eos_token is not None else None
        if eos_id is not None:
            eos_ids.append(eos_id)
        if eos_token is None and eos_ids:
            eos_token = hf.id_to_token(eos_ids[0])

        # Newer checkpoints keep the template in chat_template.jinja instead of tokenizer_config.json.
        template_source, template_file = _pick_chat_template(config.get("chat_template")), config_file
        jinja_file = folder / "chat_template.jinja"
        if template_source is None and jinja_file.is_file():
            template_source, template_file = jinja_file.read_text(encoding="utf-8"), jinja_file
        return cls(
            hf=hf,
            template_source=template_source or FALLBACK_CHAT_TEMPLATE,
            template_file=template_file,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=bool(config.get("add_bos_token", False)),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),  # dedupe, keep order
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Encode a rendered chat template with add_special_tokens=False: the
        template already wrote the BOS."""
        ids: list[int] = self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]  # not None when _prepend_bos
        return ids

    def to_json(self) -> str:
        """The tokenizer.json text (what grammar libraries build their token tables from)."""
        return self._hf.to_str()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render `messages` (HF's shape: role, content, and tool_calls / tool_call_id where present) and
        `tools` (OpenAI's `{"type": "function", "function": {...}}` list) with the model's template."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token or "",
                eos_token=self._eos_token or "",
                tools=tools,
                documents=None,
            )
        except Exception as e:  # the template is model-supplied code: any failure is the template's
            raise TokenizerError(f"{self._template_file}: chat template failed: {e}") from e


def _compile_template(source: str, template_file: Path) -> tuple[jinja2.Template, set[str]]:
    """The compiled template and the names it reads from its context (`messages`, `tools`, ...)."""
    # The same environment as HF's apply_chat_template, so templates render byte-identically;
    # sandboxed because the template comes from a downloaded checkpoint.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        ast = env.parse(source)
        return env.from_string(ast), jinja2.meta.find_undeclared_variables(ast)
    except jinja2.TemplateError as e:  # syntax errors show at load time, not on the first request
        raise TokenizerError(f"{template_file}: chat template does not compile: {e}") from e


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Decoding one token alone is wrong twice over: a token may hold part of a UTF-8 character, and
    SentencePiece-style decoders drop the leading space of the first token they see. So each step
    decodes a short window of earlier tokens plus the new ones and emits the difference (vLLM's
    detokenize_incrementally): tokens [prefix_offset, read_offset) are context already emitted,
    [read_offset, end) are not yet emitted. While the window's text ends in U+FFFD the character is
    incomplete, and the tokens wait for the next push. The cost per token is bounded by the window.
    The concatenated deltas are the continuation of the prompt text (for byte-level tokenizers,
    exactly decode(output ids)).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])  # only the context we use
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def _window_texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        ids, skip = self._ids, self._skip_special_tokens
        prefix_text = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = decode(ids[self._prefix_offset :], skip_special_tokens=skip)
        return prefix_text, new_text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        # Shorter or equal: the token decoded to nothing yet (skipped special token, first bytes of a
        # character). Keep the offsets so its text comes with a later token.
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 64:  # drop tokens left of the window so memory stays bounded too
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the stream: emit what was held back, U+FFFD included if the bytes never completed."""
        prefix_text, new_text = self._window_texts()
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta
