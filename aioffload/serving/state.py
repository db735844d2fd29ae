"""What the routes of one server share: its config, metrics, the engine once loaded, the grammar
compiler once built, and the token strings of logprobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aioffload.config import ServerConfig
from aioffload.serving.logprobs import TokenStrings
from aioffload.serving.metrics import Metrics
from aioffload.serving.structured_output import Grammars

if TYPE_CHECKING:
    from aioffload.engine.async_engine import Engine


@dataclass
class ServerState:
    """`engine` is None until the model is loaded."""

    config: ServerConfig
    metrics: Metrics
    engine: Engine | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    grammars: Grammars = field(default_factory=Grammars)
    _strings: TokenStrings | None = None

    def token_strings(self, engine: Engine) -> TokenStrings:
        if self._strings is None:
            self._strings = TokenStrings(engine.tokenizer)
        return self._strings
