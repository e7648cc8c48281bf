"""Per adapter version: engine requests finished, tokens, last use; since the server started.

Prometheus counts tokens per adapter *name* (`owner/name`: a bounded label set). The
console lists versions, so it keeps its own small table keyed by `tenant/name@version`
(AdapterRecord.key), fed by the same RequestTimer that feeds the counters.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Usage:
    requests: int = 0           # engine requests finished (each choice of an n>1 request counts)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_used: float | None = None   # time.time() of the last finished request


class AdapterUsage:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_key: dict[str, Usage] = {}

    def record(self, key: str, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            u = self._by_key.setdefault(key, Usage())
            u.requests += 1
            u.prompt_tokens += prompt_tokens
            u.generated_tokens += generated_tokens
            u.last_used = time.time()

    def get(self, key: str) -> Usage:
        with self._lock:
            u = self._by_key.get(key)
            return Usage() if u is None else Usage(u.requests, u.prompt_tokens, u.generated_tokens, u.last_used)
