"""Plain-object helpers of the scheduler tests: an adapter tier where every adapter pins
at once, a sequence of n prompt tokens, and one engine step without a model."""

from __future__ import annotations

from collections import Counter

from loraserve.adapters.pin import Pin
from loraserve.scheduler import Scheduler
from loraserve.sequence import Sequence


class AnyAdapter:
    """Every adapter pins at once (slots are not what these tests are about)."""

    def __init__(self):
        self.pins = Counter()

    def try_pin(self, key):
        self.pins[key] += 1
        return Pin.PINNED

    def is_pinned(self, key):
        return key in self.pins

    def unpin(self, key):
        self.pins[key] -= 1


def prompt_seq(i: int, n: int, priority: int) -> Sequence:
    return Sequence(i, list(range(i * 100, i * 100 + n)), params=None, priority=priority)


def step(sched: Scheduler):
    """Schedule, advance, and give every sequence that needs one a token (7)."""
    batch = sched.schedule()
    for s in sched.advance(batch):
        s.output_token_ids.append(7)
    return batch
