"""A FakeEngine with the real Engine's interface, a byte tokenizer, and a uvicorn test server.

Text is deterministic from the prompt: token i of choice j is WORDS[(sum(prompt_ids) + i + j) % len(WORDS)]
(choice 0 of n); or, with `script` set, the engine "samples" the script's byte tokens (FakeTokenizer
ids) in order. Like the real engine: n choices interleave (told apart by `index`), best_of > n yields
the n of highest cumulative logprob once all ended, logprobs are `fake_logprob` of each position, and
a logits mask (SamplingParams.logits_mask, one provider per choice) is obeyed: the script's token if
the mask allows it, else the smallest allowed id; a finished provider ends the choice.
A "model step" optionally sleeps `token_delay_s` in a worker thread (the event loop stays
free, as with the real engine). KV blocks are held from admission until the request
finishes or `abort()` is called; closing the output generator alone does NOT free them,
so a server that forgets to abort leaks fake KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn

from aioffload.config import EngineConfig
from aioffload.engine.outputs import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
)
from aioffload.worker.logprobs import TokenLogprob
from aioffload.worker.masks import allocate_bitmask, allows
from aioffload.worker.sampling import SamplingParams

WORDS = [" alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta", " iota", " kappa"]
BOS = 256
SPECIALS = {BOS: "<s>", 257: "[TOOL_CALLS]", 258: "</s>"}  # special: left out of decoded text by default
EOS = 258


def fake_logprob(token_id: int, position: int, choice: int, num_top: int) -> TokenLogprob:
    """What the fake engine reports for the token at `position` (of the prompt, or of choice's output)."""
    value = -0.25 * (1 + (position + 2 * choice) % 4)
    return TokenLogprob(token_id, value, tuple(((token_id + 1 + t) % 256, -0.1 * (t + 1)) for t in range(num_top)))


class FakeTokenizer:
    """Bytes are ids 0-255; SPECIALS above them. The "template" renders tools (Hermes-style markers)."""

    vocab_size = 300
    chat_template = "{{ tools }} {{ messages }} <tool_call>"
    template_uses_tools = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for part in text.split("[TOOL_CALLS]"):
            ids += [*part.encode("utf-8"), 257]
        ids = ids[:-1]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for t in ids:
            if t < 256:
                run.append(t)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append("" if skip_special_tokens else SPECIALS.get(t, ""))
        return "".join(out) + run.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """A byte-level tokenizer.json of the same ids (what the grammar compiler reads)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        chars, extra = {}, 0
        for b in range(256):
            chars[b] = chr(b) if b in printable else chr(256 + extra)
            extra += b not in printable
        tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([SPECIALS[i] for i in sorted(SPECIALS)])
        return tok.to_str()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        text = f"<tools>{json.dumps(tools)}</tools>\n" if tools else ""
        for m in messages:
            calls = "".join(f"<call>{json.dumps(c)}</call>" for c in m.get("tool_calls", []))
            text += f"<{m['role']}>{m['content']}{calls}\n"
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Slot:
    num_prompt_tokens: int
    num_blocks: int = 0
    aborted: bool = False


class FakeEngine:
    def __init__(self, model_name: str = "fake-model", max_model_len: int = 256, token_delay_s: float = 0.0,
                 max_running: int = 64, block_size: int = 4, num_blocks: int = 1024) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.token_delay_s = token_delay_s
        self.max_running = max_running
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.running: dict[str, _Slot] = {}
        self.aborted: list[str] = []
        self.calls: list[tuple[list[int], SamplingParams, str]] = []
        self.fail_after: int | None = None  # raise RuntimeError after this many tokens
        self.script: list[int] | None = None  # token ids to "sample", then EOS
        self.eos_token_ids = (EOS,)
        self.worker = types.SimpleNamespace(model_config=types.SimpleNamespace(vocab_size=FakeTokenizer.vocab_size),
                                            fill_masks=None)  # what the grammar compiler's wiring touches
        self.accepting = True
        self.started = False
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> FakeEngine:
        return cls(model_name=config.served_model_name or "fake-model")

    @staticmethod
    def expected_text(prompt_ids: list[int], num_tokens: int, choice: int = 0) -> str:
        return "".join(WORDS[(sum(prompt_ids) + i + choice) % len(WORDS)] for i in range(num_tokens))

    @property
    def kv_usage(self) -> float:
        return sum(s.num_blocks for s in self.running.values()) / self.num_blocks

    is_dead = False

    def stats(self) -> dict[str, float]:
        used = sum(s.num_blocks for s in self.running.values())
        return {"num_running": len(self.running), "num_waiting": 0, "kv_usage": used / self.num_blocks,
                "kv_blocks_free": self.num_blocks - used, "kv_blocks_total": self.num_blocks,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "offload_bytes_per_step": 1.5e6, "copy_busy_fraction": 0.25}

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, timeout_s: float) -> None:
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for request_id in list(self.running):
            self.abort(request_id)
        while self.running:  # aborted requests leave at their next step
            await asyncio.sleep(0.01)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        slot = self.running.pop(request_id, None)
        if slot is not None:
            slot.aborted = True  # the blocks return now; the generator ends at its next step

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not self.accepting:
            raise EngineDeadError("engine is shutting down")
        if len(self.running) >= self.max_running:
            raise QueueFullError("queue full")
        if len(ids) > self.max_model_len - 1:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens is too long")
        m = params.num_candidates
        if m > self.max_running:
            raise InvalidRequestError("best_of" if params.best_of else "n", f"{m} sequences exceed --max-num-seqs")
        self.calls.append((ids, params, request_id))
        slot = self.running[request_id] = _Slot(len(ids))
        self.prompt_tokens_total += len(ids)
        choices = [_FakeChoice(j, params.logits_mask() if params.logits_mask else None) for j in range(m)]
        for i in range(params.max_tokens):
            if self.token_delay_s:
                await asyncio.to_thread(time.sleep, self.token_delay_s)
            else:
                await asyncio.sleep(0)
            if slot.aborted:
                for c in choices:
                    if not c.done:
                        yield RequestOutput(request_id, "", [], True, "abort", len(ids), i, index=c.index)
                return
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("fake engine failure")
            slot.num_blocks = m * -(-(len(ids) + i + 1) // self.block_size)
            outs = []
            for c in choices:
                if c.done:
                    continue
                out = self._step(c, ids, i, params)
                out.request_id = request_id
                if i == 0 and params.prompt_logprobs is not None:
                    out.prompt_logprobs = [None] + [fake_logprob(t, p, 0, params.prompt_logprobs)
                                                    for p, t in enumerate(ids) if p > 0]
                outs.append(out)
            if all(c.done for c in choices):
                self.running.pop(request_id, None)  # the blocks return when the last choice ends
            if m == params.n:
                for out in outs:
                    yield out
            else:  # best_of > n: whole candidates, ranked once all ended
                for out in outs:
                    c = choices[out.index]
                    if c.whole is None:
                        c.whole = out
                    else:
                        c.whole.merge(out)
            if all(c.done for c in choices):
                break
        if m > params.n:
            best = sorted((c.whole for c in choices if c.whole), key=lambda o: (-(o.cumulative_logprob or 0), o.index))
            for rank, out in enumerate(best[: params.n]):
                out.index = rank
                yield out

    def _step(self, c: _FakeChoice, ids: list[int], i: int, params: SamplingParams) -> RequestOutput:
        """Choice c's token i, as one output."""
        word, token = WORDS[(sum(ids) + i + c.index) % len(WORDS)], i
        if self.script is not None:
            token = self.script[i] if i < len(self.script) else EOS
            # as the engine: special tokens kept when the request asks, the finishing ids left out
            keep = not params.skip_special_tokens and token not in (EOS, *params.stop_token_ids)
            word = self.tokenizer.decode([token], skip_special_tokens=not keep)
        finished, reason = i + 1 == params.max_tokens, "length"
        if c.mask is not None:
            token, word, finished, reason = self._constrained(c, token, finished, reason)
        self.generation_tokens_total += 1
        stop = next((s for s in params.stop if s in c.text + word), None)
        if token == EOS and (self.script is not None or c.mask is not None):
            finished, reason = True, "stop"
        if stop is not None:
            word = (c.text + word)[: (c.text + word).index(stop)][len(c.text):]
            finished, reason = True, "stop"
        c.text += word
        c.done = finished
        out = RequestOutput("", word, [token], finished, reason if finished else None, len(ids), i + 1, c.index)
        if params.logprobs is not None:
            out.logprobs = [fake_logprob(token, len(ids) + i, c.index, params.logprobs)]
            c.cumulative += out.logprobs[0].logprob
            out.cumulative_logprob = c.cumulative
        return out

    def _constrained(self, c: _FakeChoice, token: int, finished: bool, reason: str) -> tuple[int, str, bool, str]:
        assert c.mask is not None
        if c.mask.is_finished:
            return EOS, "", True, "stop"
        bitmask = allocate_bitmask(1, self.tokenizer.vocab_size)
        c.mask.fill(bitmask, 0)
        if not allows(bitmask, 0, token):
            token = next(t for t in range(self.tokenizer.vocab_size) if allows(bitmask, 0, t))
        if token == EOS:
            return EOS, "", True, "stop"
        c.mask.accept(token)
        return token, self.tokenizer.decode([token]), finished or c.mask.is_finished, "stop" if c.mask.is_finished \
            else reason


@dataclass
class _FakeChoice:
    index: int
    mask: object | None = None  # a LogitsMaskProvider
    text: str = ""
    done: bool = False
    cumulative: float = 0.0
    whole: RequestOutput | None = None  # best_of: its output so far, merged


@contextlib.contextmanager
def serve(app: object) -> Iterator[str]:
    """Serve an ASGI app with real uvicorn on a free loopback port in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

