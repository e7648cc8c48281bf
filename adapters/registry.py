"""Adapter names to device slots, through the three tiers: the durable store on disk,
the CPU tier of loaded weights, and the device slot pool the kernels read.

The engine resolves a request's adapter reference to a record (an immutable version:
its key never names other weights), the scheduler pins the record's key for the
request's lifetime (bookkeeping only), and `make_resident()`, once per engine step,
moves weights: the slots pinned since the last step are written, and the adapters that
were asked for while still on disk start loading in the background.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from .cpu_tier import CpuTier
from .record import AdapterRecord
from .slot_pool import SlotPool
from .store import AdapterStore


class AdapterRegistry:
    def __init__(self, store: AdapterStore, max_loras: int, max_cpu_loras: int, dtype: torch.dtype,
                 device: torch.device | str, before_load: Callable[[AdapterRecord], None] | None = None,
                 int8_slots: bool = False):
        self.store = store
        self.cpu = CpuTier(store.load, max_cpu_loras, before_load=before_load)
        self.slots = SlotPool.allocate(store.spec, max_loras, self._fetch, dtype, device, int8_slots)
        self._records: dict[str, AdapterRecord] = {}
        self._retained: dict[str, object] = {}    # deleted versions that accepted requests still use
        self._lock = threading.Lock()

    def admit(self, record: AdapterRecord) -> None:
        """A request on this version was accepted: remember its record, so the slot pool and
        the CPU tier can load it by key."""
        with self._lock:
            self._records[record.key] = record

    def record(self, key: str) -> AdapterRecord:
        return self._records[key]

    def make_resident(self) -> list[int]:
        """The one place adapter weights move: copy the adapters pinned since the last
        step into their slots, and start loading the ones still on disk. Returns the
        slots written."""
        written = self.slots.write_pending()
        for key in self.slots.take_wanted():
            self.cpu.request(self._records[key])
        return written

    def tier(self, record: AdapterRecord) -> str:
        if record.key in self.slots.slot_of:
            return "device"
        return "cpu" if self.cpu.contains(record.key) else "disk"

    def retain(self, record: AdapterRecord) -> None:
        """Keep a version's weights in memory before its files are deleted, for the
        requests that were accepted with it and have not finished."""
        key = record.key
        self._retained[key] = self._retained.get(key) or self.cpu.peek(key) or self.store.load(record)

    def is_retained(self, key: str) -> bool:
        return key in self._retained

    def forget(self, key: str) -> None:
        """Drop every copy of a deleted version; a pinned slot stays until its requests end."""
        self._retained.pop(key, None)
        self.slots.drop(key)
        self.cpu.drop(key)

    def resident(self) -> dict[str, list[str]]:
        return {"device": sorted(self.slots.slot_of), "cpu": self.cpu.keys()}

    def _fetch(self, key: str):
        retained = self._retained.get(key)
        return retained if retained is not None else self.cpu.peek(key)
