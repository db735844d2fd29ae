"""The `logprobs` objects of a response, from the engine's `TokenLogprob`s (docs/engine-sampling.md).

Values are log-softmax of the raw model logits (before penalties, biases, masks, temperature,
top-k and top-p), as vLLM returns them. Completions: `{tokens, token_logprobs, top_logprobs,
text_offset}`, `top_logprobs` a dict token -> logprob of the `logprobs` most likely tokens plus the
chosen one (as OpenAI's legacy API: up to logprobs + 1 entries), an echoed prompt's first token
`null`. Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`,
exactly `top_logprobs` alternatives.

A token's string is its own decoded text, special tokens kept. A byte-level token that holds part
of a UTF-8 character has no text of its own: it is written `bytes:\\xe2\\x80` (OpenAI's way) and
its `bytes` are the raw ones, so that a client can join them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Protocol

from aioffload.worker.logprobs import TokenLogprob

Item = tuple[int, "TokenLogprob | None"]  # a token id and its entry (None: the first prompt token)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


class _Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenStrings:
    """Token id -> (its string, its bytes), cached; one per served tokenizer."""

    def __init__(self, tokenizer: _Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._raw: dict[int, bytes] | None = None

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._resolve(token_id)
        return hit

    def _resolve(self, token_id: int) -> tuple[str, bytes]:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text, text.encode()
        raw = self._raw_bytes().get(token_id)
        if raw is None:
            return text, text.encode()
        try:
            return raw.decode("utf-8"), raw  # a token that really is U+FFFD
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def _raw_bytes(self) -> dict[int, bytes]:
        """The bytes of the vocabulary's byte-level or byte-fallback tokens (read once from tokenizer.json)."""
        if self._raw is None:
            self._raw = {}
            to_json = getattr(self._tokenizer, "to_json", None)
            data = json.loads(to_json()) if to_json is not None else {}
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                byte_level = "ByteLevel" in json.dumps(data.get("decoder"))
                decoder = byte_decoder()
                for piece, tid in vocab.items():
                    fallback = _BYTE_TOKEN.match(piece)
                    if fallback:
                        self._raw[tid] = bytes([int(fallback.group(1), 16)])
                    elif byte_level and all(ch in decoder for ch in piece):
                        self._raw[tid] = bytes(decoder[ch] for ch in piece)
        return self._raw


class CompletionLogprobs:
    """One choice's completions `logprobs`, delta by delta (text_offset runs on over the deltas)."""

    def __init__(self, strings: TokenStrings) -> None:
        self.strings = strings
        self.offset = 0

    def format(self, items: Sequence[Item]) -> dict[str, Any]:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, entry in items:
            text = self.strings.text(token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if entry is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(entry.logprob)
            top = {self.strings.text(t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)  # the chosen token is always there (OpenAI: up to k + 1)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class ChatLogprobs:
    """One choice's chat `logprobs`."""

    def __init__(self, strings: TokenStrings) -> None:
        self.strings = strings

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.strings.get(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def format(self, items: Sequence[Item]) -> dict[str, Any]:
        content = []
        for token_id, entry in items:
            if entry is None:  # a prompt token: never in a chat response
                continue
            top = [self._token(t, lp) for t, lp in entry.top]
            content.append({**self._token(token_id, entry.logprob), "top_logprobs": top})
        return {"content": content, "refusal": None}


class LogprobsWriter(Protocol):
    def format(self, items: Sequence[Item]) -> dict[str, Any]: ...
