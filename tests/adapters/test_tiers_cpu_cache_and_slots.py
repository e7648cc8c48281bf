"""CPU tier (LRU, background loads, failures) and the device slot pool (pins, LRU eviction,
writes queued by pinning and done by write_pending), each on its own with fake records.
The tier tests are together here: the engine driving the tiers is test_tiers_engine.py,
the embedded model through them test_tiers_e2e.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loraserve.adapters import CpuTier, Pin, SlotPool


@dataclass(frozen=True)
class Rec:
    key: str
    tenant: str = "t"
    name: str = "n"
    version: int = 1


@dataclass
class Weights:
    rank: int = 8


def wait_loaded(tier: CpuTier, rec, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = tier.get(rec)
        if got is not None:
            return got
        tier.wait(0.05)
    raise AssertionError(f"{rec.key} never loaded")


def test_cpu_tier_loads_in_background_and_keeps_lru():
    loads = []
    tier = CpuTier(lambda r: loads.append(r.key) or Weights(), max_entries=2)
    a, b, c = Rec("a"), Rec("b"), Rec("c")
    assert tier.get(a) is None                       # not there yet: a load was queued
    wait_loaded(tier, a)
    wait_loaded(tier, b)
    tier.get(a)                                      # a is now more recent than b
    wait_loaded(tier, c)                             # evicts b, the least recently used
    assert tier.keys() == ["a", "c"]
    assert loads == ["a", "b", "c"] and tier.num_loads == 3 and tier.num_hits >= 3
    assert tier.load_seconds_total > 0


def test_cpu_tier_get_never_blocks_on_a_slow_load():
    gate = threading.Event()
    tier = CpuTier(lambda r: Weights(), max_entries=4, before_load=lambda r: gate.wait(5) if r.key == "slow" else None)
    start = time.monotonic()
    assert tier.get(Rec("slow")) is None
    assert tier.get(Rec("slow")) is None             # asked again: still loading, one load queued
    assert time.monotonic() - start < 0.5
    gate.set()
    wait_loaded(tier, Rec("slow"))
    assert tier.num_loads == 1


def test_cpu_tier_reports_failed_loads_once():
    def load(r):
        raise FileNotFoundError("gone")
    tier = CpuTier(load, max_entries=2)
    tier.get(Rec("x"))
    deadline = time.monotonic() + 5
    failures = {}
    while not failures and time.monotonic() < deadline:
        tier.wait(0.05)
        failures = tier.take_failures()
    assert "gone" in failures["x"] and tier.take_failures() == {}


def slots_with(loaded: dict, max_loras=2):
    return SlotPool(max_loras, loaded.get)


def test_slot_pool_pin_evict_lru_unpinned():
    slots = slots_with({"a": Weights(), "b": Weights(rank=4), "c": Weights()})
    assert slots.try_pin("a") is Pin.PINNED and slots.try_pin("b") is Pin.PINNED
    assert slots.try_pin("c") is Pin.NO_SLOT         # both pinned
    assert sorted(slots.write_pending()) == [0, 1]   # pinning only queued the copies
    assert slots.ranks == [8, 4]
    slots.unpin("a")
    assert slots.try_pin("c") is Pin.PINNED          # evicts a
    assert "a" not in slots.slot_of and slots.num_evictions == 1
    assert slots.slot("c") == 0 and slots.slot(None) == -1
    assert slots.write_pending() == [0] and slots.write_pending() == []
    slots.unpin("b")
    slots.unpin("c")
    assert slots.try_pin("b") is Pin.PINNED and slots.num_hits == 1   # still resident: no copy
    assert slots.write_pending() == [] and slots.num_loads == 3


def test_slot_pool_loading_and_drop():
    slots = slots_with({"a": Weights()})
    assert slots.try_pin("missing") is Pin.LOADING
    assert slots.take_wanted() == {"missing"} and slots.take_wanted() == set()
    assert slots.try_pin("a") is Pin.PINNED
    slots.drop("a")                                  # pinned: stays
    assert "a" in slots.slot_of
    slots.unpin("a")
    slots.drop("a")                                  # dropped before its copy: the copy is cancelled
    assert "a" not in slots.slot_of and len(slots.free) == 2 and slots.write_pending() == []


def test_cpu_tier_peek_starts_nothing_and_request_loads():
    loads = []
    tier = CpuTier(lambda r: loads.append(r.key) or Weights(), max_entries=2)
    assert tier.peek("a") is None
    tier.request(Rec("a"))
    tier.request(Rec("a"))                           # already loading: one load
    wait_loaded(tier, Rec("a"))
    assert loads == ["a"] and tier.peek("a") is not None
