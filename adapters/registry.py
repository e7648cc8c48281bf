"""Adapter names to device slots, through the three tiers: the durable store on disk,
the CPU tier of loaded weights, and the device slots the kernels read.

The engine resolves a request's adapter reference to a record (an immutable version:
its key never names other weights), the scheduler pins the record's key for the
request's lifetime, and a pin that finds the weights still on disk starts a background
load instead of waiting for it.
"""

from __future__ import annotations

import threading

from .cpu_tier import CpuTier
from .device_slots import DeviceSlots
from .record import AdapterRecord
from .store import AdapterStore


class AdapterRegistry:
    def __init__(self, store: AdapterStore, max_loras: int, max_cpu_loras: int, write_slot):
        self.store = store
        self.cpu = CpuTier(store.load, max_cpu_loras)
        self.slots = DeviceSlots(max_loras, write_slot, self._fetch)
        self._records: dict[str, AdapterRecord] = {}
        self._retained: dict[str, object] = {}    # deleted versions that accepted requests still use
        self._lock = threading.Lock()

    def resolve(self, tenant: str, ref: str) -> AdapterRecord:
        record = self.store.resolve(tenant, ref)
        with self._lock:
            self._records[record.key] = record
        return record

    def record(self, key: str) -> AdapterRecord:
        return self._records[key]

    def tier(self, record: AdapterRecord) -> str:
        if record.key in self.slots.slot_of:
            return "device"
        return "cpu" if self.cpu.contains(record.key) else "disk"

    def retain(self, record: AdapterRecord) -> None:
        """Keep a version's weights in memory before its files are deleted, for the
        requests that were accepted with it and have not finished."""
        if record.key not in self.slots.slot_of and not self.cpu.contains(record.key):
            self._retained[record.key] = self.store.load(record)
        else:
            self._retained[record.key] = self.cpu.get(record) or self._retained.get(record.key)

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
        return retained if retained is not None else self.cpu.get(self._records[key])
