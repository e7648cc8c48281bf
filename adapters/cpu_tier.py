"""The CPU tier: adapters read from the store and held in memory, least recently used
first out, filled by background loader threads so no engine step waits on disk.

`get(record)` never blocks: it returns the loaded weights, or None after asking the
loader for them (`peek` and `request`, the two halves, for callers that decide first and
load later). The engine asks again on a later step; `wait(timeout)` lets an idle engine
sleep until a load finishes instead of spinning.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

from .peft_format import LoRAAdapter
from .record import AdapterRecord

log = logging.getLogger(__name__)


class CpuTier:
    def __init__(self, load: Callable[[AdapterRecord], LoRAAdapter], max_entries: int, num_loaders: int = 4,
                 before_load: Callable[[AdapterRecord], None] | None = None):
        """`before_load(record)` runs on the loader thread before each read (a seam: tests
        slow a load down or make it fail)."""
        self._load = load
        self.max_entries = max_entries
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()   # key -> weights, LRU first
        self._lock = threading.Lock()
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}                            # key -> error, until taken
        self._queue: queue.Queue[AdapterRecord | None] = queue.Queue()
        self._loaded = threading.Condition(self._lock)
        self._before_load = before_load
        self.num_hits = 0
        self.num_loads = 0
        self.load_seconds_total = 0.0
        self.recent_load_seconds: deque[float] = deque(maxlen=4096)   # for percentiles
        # several loaders, so one slow read (a large adapter, a slow disk) does not hold
        # up the loads queued behind it
        self._threads = [threading.Thread(target=self._run, name=f"loraserve-adapter-loader-{i}", daemon=True)
                         for i in range(num_loaders)]
        for thread in self._threads:
            thread.start()

    def get(self, record: AdapterRecord) -> LoRAAdapter | None:
        """The loaded weights, or None after asking a loader for them."""
        adapter = self.peek(record.key)
        if adapter is None:
            self.request(record)
        return adapter

    def peek(self, key: str) -> LoRAAdapter | None:
        """The loaded weights (now the most recently used), or None; starts nothing."""
        with self._lock:
            adapter = self._cache.get(key)
            if adapter is not None:
                self._cache.move_to_end(key)
                self.num_hits += 1
            return adapter

    def request(self, record: AdapterRecord) -> None:
        """Queue a background load, unless the weights are here, loading, or just failed."""
        with self._lock:
            key = record.key
            if key not in self._cache and key not in self._loading and key not in self._failed:
                self._loading.add(key)
                self._queue.put(record)

    def put(self, key: str, adapter: LoRAAdapter) -> None:
        """Insert already-loaded weights (e.g. just validated), evicting the LRU entry."""
        with self._lock:
            self._insert(key, adapter)

    def drop(self, key: str) -> None:
        with self._lock:
            self._cache.pop(key, None)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._cache

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def take_failures(self) -> dict[str, str]:
        """Loads that failed since the last call (key -> message); their requests must fail."""
        with self._lock:
            failed, self._failed = self._failed, {}
            return failed

    def wait(self, timeout: float) -> None:
        """Sleep until some load finishes or the timeout passes."""
        with self._loaded:
            if self._loading:
                self._loaded.wait(timeout)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _insert(self, key: str, adapter: LoRAAdapter) -> None:
        self._cache[key] = adapter
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            start = time.perf_counter()
            try:
                if self._before_load is not None:
                    self._before_load(record)
                adapter = self._load(record)
                error = None
            except Exception as e:   # noqa: BLE001 - reported to the requests that wanted it
                log.warning("could not load adapter %s: %s", record.key, e)
                adapter, error = None, f"adapter {record.tenant}/{record.name}@{record.version} could not be loaded: {e}"
            with self._loaded:
                self._loading.discard(record.key)
                if adapter is not None:
                    self._insert(record.key, adapter)
                    self.num_loads += 1
                    elapsed = time.perf_counter() - start
                    self.load_seconds_total += elapsed
                    self.recent_load_seconds.append(elapsed)
                else:
                    self._failed[record.key] = error
                self._loaded.notify_all()
