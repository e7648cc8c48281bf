"""The device tier: which adapter sits in which slot, and which may be evicted.

A running request pins its adapter's slot; an adapter that no request pins stays
resident (a later request for it is free) until a slot is needed, then the least
recently used unpinned one is evicted. Slot -1 means "no adapter" and is never stored.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from typing import Callable


class Pin(str, enum.Enum):
    PINNED = "pinned"      # resident now, and held for the request
    LOADING = "loading"    # its weights are still being read: ask again on a later step
    NO_SLOT = "no_slot"    # every slot is pinned by running requests


class DeviceSlots:
    def __init__(self, max_loras: int, write_slot: Callable[[int, object], None],
                 fetch: Callable[[str], object | None]):
        """write_slot(slot, adapter) copies weights to the device; fetch(key) returns
        the adapter's loaded weights, or None while they are not in memory yet."""
        self.max_loras = max_loras
        self.write_slot = write_slot
        self.fetch = fetch
        self.slot_of: dict[str, int] = {}
        self.pins: Counter[str] = Counter()
        self.unpinned: OrderedDict[str, None] = OrderedDict()   # resident, evictable, LRU first
        self.free = list(range(max_loras - 1, -1, -1))
        self.num_loads = 0
        self.num_evictions = 0
        self.num_hits = 0

    def try_pin(self, key: str) -> Pin:
        if key in self.slot_of:
            self.num_hits += 1
        else:
            adapter = self.fetch(key)          # starts a background load when needed
            if adapter is None:
                return Pin.LOADING
            if not self.free and not self.unpinned:
                return Pin.NO_SLOT
            self._load(key, adapter)
        self.pins[key] += 1
        self.unpinned.pop(key, None)
        return Pin.PINNED

    def is_pinned(self, key: str) -> bool:
        return key in self.pins

    def unpin(self, key: str) -> None:
        self.pins[key] -= 1
        if self.pins[key] == 0:
            del self.pins[key]
            self.unpinned[key] = None

    def slot(self, key: str | None) -> int:
        return -1 if key is None else self.slot_of[key]

    def drop(self, key: str) -> None:
        """Forget a resident adapter that no request pins (deleted, or replaced by an
        in-place load); a pinned one stays until its requests end."""
        if key in self.slot_of and key not in self.pins:
            self.unpinned.pop(key, None)
            self.free.append(self.slot_of.pop(key))

    @property
    def num_used(self) -> int:
        return len(self.slot_of)

    def _load(self, key: str, adapter) -> None:
        if not self.free:
            victim, _ = self.unpinned.popitem(last=False)
            self.free.append(self.slot_of.pop(victim))
            self.num_evictions += 1
        slot = self.free.pop()
        self.write_slot(slot, adapter)
        self.slot_of[key] = slot
        self.num_loads += 1
