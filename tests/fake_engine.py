"""A FakeEngine with the real Engine's interface, a byte tokenizer, and a uvicorn test server.

Text is deterministic from the prompt: token i is WORDS[(sum(prompt_ids) + i) % len(WORDS)];
or, with `script` set, the engine "samples" the script's byte tokens (FakeTokenizer ids) in order.
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn

from aioffload.config import EngineConfig
from aioffload.engine.outputs import EngineDeadError, PromptTooLongError, QueueFullError, RequestOutput
from aioffload.worker.sampling import SamplingParams

WORDS = [" alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta", " iota", " kappa"]
BOS = 256
SPECIALS = {BOS: "<s>", 257: "[TOOL_CALLS]", 258: "</s>"}  # special: left out of decoded text by default
EOS = 258


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
        self.accepting = True
        self.started = False
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> FakeEngine:
        return cls(model_name=config.served_model_name or "fake-model")

    @staticmethod
    def expected_text(prompt_ids: list[int], num_tokens: int) -> str:
        return "".join(WORDS[(sum(prompt_ids) + i) % len(WORDS)] for i in range(num_tokens))

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
        self.calls.append((ids, params, request_id))
        slot = self.running[request_id] = _Slot(len(ids))
        self.prompt_tokens_total += len(ids)
        text = ""
        for i in range(params.max_tokens):
            if self.token_delay_s:
                await asyncio.to_thread(time.sleep, self.token_delay_s)
            else:
                await asyncio.sleep(0)
            if slot.aborted:
                yield RequestOutput(request_id, "", [], True, "abort", len(ids), i)
                return
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("fake engine failure")
            word, token = WORDS[(sum(ids) + i) % len(WORDS)], i
            if self.script is not None:
                token = self.script[i] if i < len(self.script) else EOS
                word = self.tokenizer.decode([token])
            slot.num_blocks = -(-(len(ids) + i + 1) // self.block_size)
            self.generation_tokens_total += 1
            stop = next((s for s in params.stop if s in text + word), None)
            finished, reason = i + 1 == params.max_tokens, "length"
            if token == EOS and self.script is not None:
                finished, reason = True, "stop"
            if stop is not None:
                word = (text + word)[: (text + word).index(stop)][len(text):]
                finished, reason = True, "stop"
            text += word
            if finished:
                self.running.pop(request_id, None)
            finish_reason = reason if finished else None
            yield RequestOutput(request_id, word, [token], finished, finish_reason, len(ids), i + 1)
            if finished:
                return


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

