"""The engine's seams for tests and tools, in one declared place.

An EngineHooks is given to LLMEngine at construction (a fresh, empty one by default) and
handed down to the parts that fire each hook. Each field is read when it fires, so a
test may set one on a running engine (`engine.hooks.on_logits = ...`) and clear it
after; with every field None the engine does exactly what it would without hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class EngineHooks:
    # (sequences to sample for, their logits [n, vocab]) after the forward pass and before
    # sampling, on the engine thread; may edit the logits (a scripted model in tests)
    on_logits: Callable | None = None
    # (sequence, token id) as a request gets a token, before it is detokenized; an
    # exception fails that request alone, as a fault in its post-processing would
    on_token: Callable | None = None
    # (adapter record) on a loader thread, before the adapter is read from disk; may
    # block (a slow disk) or raise (a failing one)
    before_adapter_load: Callable | None = None
    # () on AsyncEngine's loop thread before each step it would run; False holds the step
    # back for this round, as if there were nothing to do (commands still run)
    may_step: Callable | None = None

    def adapter_load(self, record) -> None:
        if self.before_adapter_load is not None:
            self.before_adapter_load(record)
