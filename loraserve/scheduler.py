"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step first serves the running requests (a decode token, or the next chunk of a
long prompt), preempting the newest by recompute when KV blocks run out, then admits
waiting requests while the token budget, the sequence limit, KV blocks and adapter
slots allow. No torch here: tested with plain sequences and a fake adapter pool.

Priorities (`Sequence.priority`, lower first) keep background work behind interactive
traffic: waiting requests queue by priority, then arrival; running ones claim the token
budget in priority order; a waiting request that finds no sequence place or KV blocks
preempts the newest running request of a lower priority; and no lower-priority prompt
joins a step that prefills a more urgent one (that step is the urgent request's time to
first token). Batch API lines run at BATCH_PRIORITY, everything else at
INTERACTIVE_PRIORITY.

Background cap: while a more urgent request is waiting or running, and for
`background_hold_steps` steps after (interactive traffic comes in sessions; the step
already running when a request arrives is part of its time to first token), the less
urgent requests take at most `max_background_tokens` tokens of a step: a decode is one,
a prompt is chunked to what is left. The oldest of them take the cap first. A step that
prefills an urgent prompt carries no background tokens at all (that step is the urgent
request's time to first token), unless the step before held them out too: background
work moves at least every other step, so it slows down but never stops. With no urgent
work in sight the cap is off and background work runs at full speed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from loraserve.adapters.pin import Pin

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


INTERACTIVE_PRIORITY, BATCH_PRIORITY = 0, 1


class AdapterPins(Protocol):
    """The adapter tiers as the scheduler sees them: a request holds a pin on its
    adapter's device slot from admission until it finishes or is preempted."""

    def try_pin(self, adapter_key: str) -> Pin: ...   # bookkeeping only: no weights move
    def unpin(self, adapter_key: str) -> None: ...
    def is_pinned(self, adapter_key: str) -> bool: ...


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]          # (sequence, tokens computed this step)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


@dataclass
class Scheduler:
    blocks: BlockManager
    adapters: AdapterPins
    max_num_seqs: int
    max_num_batched_tokens: int
    max_slot_wait_steps: int = 16    # then requests behind one that waits for a slot hold back
    max_background_tokens: int = 0   # tokens of a step for less urgent requests while urgent ones are about; 0 = no cap
    background_hold_steps: int = 0   # the cap holds this many steps after the last urgent request
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0
    num_steps: int = 0
    _urgent_seen: dict[int, int] = field(default_factory=dict)   # priority -> last step it was the most urgent
    _background_above: int | None = None    # this step: requests less urgent than this are background
    _background_left: int = 0               # this step: tokens background requests may still take
    _held_last_step: bool = False           # the last step held background rows out for an urgent prefill

    def add(self, seq: Sequence) -> None:
        """Behind every waiting request of the same or a more urgent priority."""
        self._enqueue(seq, lambda other: other.priority > seq.priority)

    def _enqueue(self, seq: Sequence, goes_before) -> None:
        """Insert seq before the first waiting request for which goes_before(it) holds."""
        for i, other in enumerate(self.waiting):
            if goes_before(other):
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        yielded = self._yield_to_urgent()
        self.running.sort(key=lambda s: s.priority)     # stable: arrival order within a priority
        self._start_background_cap()
        held = self._hold_background_for_urgent_prefill()
        preempted = self._schedule_running(items, budget, self.running)
        if not preempted:
            self._admit_waiting(items, budget - sum(n for _, n in items))
            if held and not self._prefills_urgent(items):
                preempted = self._release_held_background(items, budget)
        self._held_last_step = held and self._prefills_urgent(items)
        return ScheduledBatch(items, preempted + yielded)

    def _yield_to_urgent(self) -> int:
        """Preempt the newest running requests of a lower priority than the first waiting
        one while it could not start for want of a sequence place or KV blocks, so an
        interactive request never queues behind batch work. Returns how many gave way."""
        if not self.waiting:
            return 0
        head = self.waiting[0]
        preempted = 0
        while self._cannot_start(head):
            victims = [s for s in self.running if s.priority > head.priority]
            if not victims:
                break
            self.preempt(max(reversed(victims), key=lambda s: s.priority))   # least urgent, newest
            preempted += 1
        return preempted

    def _start_background_cap(self) -> None:
        """Which requests count as background this step, and their token allowance: those
        less urgent than the most urgent request present now or in the last
        background_hold_steps steps."""
        self.num_steps += 1
        present = [q[0].priority for q in (self.waiting, self.running) if q]   # each queue is urgent-first
        if present:
            self._urgent_seen[min(present)] = self.num_steps
        recent = [p for p, step in self._urgent_seen.items() if self.num_steps - step <= self.background_hold_steps]
        self._background_above = min(recent) if recent and self.max_background_tokens > 0 else None
        self._background_left = self.max_background_tokens

    def _hold_background_for_urgent_prefill(self) -> bool:
        """Spend the background allowance up front when an urgent prompt will likely be
        prefilled this step (one running mid-prompt, or one at the head of the queue),
        unless the last step was held too. Returns whether it held."""
        urgent = self._background_above
        if urgent is None or self._held_last_step or not self.running or self.running[-1].priority <= urgent:
            return False        # no cap, held last step, or no background request running (running is urgent-first)
        candidates = [s for s in self.running if s.priority <= urgent]
        if self.waiting and self.waiting[0].priority <= urgent:
            candidates.append(self.waiting[0])
        if not any(s.num_tokens - s.num_computed_tokens > 1 for s in candidates):
            return False
        self._background_left = 0
        return True

    def _release_held_background(self, items, budget: int) -> int:
        """The urgent prompt did not start after all (no slot, no blocks): the background
        rows that were held out take their allowance as usual. Returns preemptions."""
        self._background_left = self.max_background_tokens
        scheduled = {id(s) for s, _ in items}
        held = [s for s in self.running if s.priority > self._background_above and id(s) not in scheduled]
        return self._schedule_running(items, budget - sum(n for _, n in items), held)

    def _prefills_urgent(self, items) -> bool:
        return self._background_above is not None and _prefills_more_urgent(items, self._background_above + 1)

    def _capped(self, seq: Sequence, n: int) -> int:
        """n, cut to the background allowance when seq is background this step."""
        if self._background_above is None or seq.priority <= self._background_above:
            return n
        return min(n, self._background_left)

    def _take(self, seq: Sequence, n: int) -> None:
        if self._background_above is not None and seq.priority > self._background_above:
            self._background_left -= n

    def _cannot_start(self, seq: Sequence) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return True
        hits = self.blocks.match_prefix(seq)
        n = min(seq.num_tokens - len(hits) * self.blocks.block_size, self.max_num_batched_tokens)
        return not self.blocks.can_admit(seq, hits, n)

    def _schedule_running(self, items, budget: int, seqs: list[Sequence]) -> int:
        """Each of `seqs` (running, urgent first) in turn, preempting the newest running
        request when KV blocks run out. Returns how many were preempted."""
        preempted = 0
        for seq in list(seqs):
            if budget <= 0 or seq.status is not SequenceStatus.RUNNING:
                break       # out of budget, or preempted for an earlier one: so is every later one
            n = self._capped(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if n == 0:
                break       # the background allowance is spent; every later request is background too
            while not self.blocks.can_allocate(seq, n):
                victim = self.running[-1]      # the newest request gives way
                self.preempt(victim)
                preempted += 1
                if victim is seq:
                    return preempted
            self.blocks.allocate(seq, n)
            items.append((seq, n))
            self._take(seq, n)
            budget -= n
        return preempted

    def _admit_waiting(self, items, budget: int) -> None:
        """FCFS, with two exceptions that keep adapters from blocking each other unfairly.
        A request whose adapter is still loading is passed over (it keeps its place), so
        it does not block requests for resident adapters. A request that finds every slot
        pinned is passed over too, and while it waits, later requests may only join
        adapters that are already pinned (they cost no slot); once it has waited
        max_slot_wait_steps steps, later adapter requests hold back entirely, running
        ones drain, a slot comes free and it gets it: no adapter starves. A request is not
        admitted into a step that prefills a more urgent one."""
        skipped: list[Sequence] = []
        blocked: Sequence | None = None        # the oldest request waiting for a slot
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if _prefills_more_urgent(items, seq.priority):
                break       # its prompt would lengthen the step an interactive request waits on
            hits = self.blocks.match_prefix(seq)
            n = self._capped(seq, min(seq.num_tokens - len(hits) * self.blocks.block_size, budget))
            if n == 0 or not self.blocks.can_admit(seq, hits, n):
                break
            if seq.adapter_key is not None and not self._pin(seq, blocked):
                if blocked is None and seq.slot_wait_steps:
                    blocked = seq
                skipped.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            seq.slot_wait_steps = 0
            self.running.append(seq)
            items.append((seq, n))
            self._take(seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _pin(self, seq: Sequence, blocked: Sequence | None) -> bool:
        key = seq.adapter_key
        if blocked is not None:
            starving = blocked.slot_wait_steps > self.max_slot_wait_steps
            if starving or not self.adapters.is_pinned(key):
                return False
        pin = self.adapters.try_pin(key)
        if pin is Pin.NO_SLOT:
            seq.slot_wait_steps += 1
        return pin is Pin.PINNED

    def preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its KV, keep its tokens, and put it first in line."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq, lambda other: other.priority >= seq.priority)   # first of its priority

    def advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """Record the computed tokens; returns the sequences that now need a sampled token
        (their whole context is computed)."""
        ready = [seq for seq, n in batch.items if seq.needs_token_after(n)]
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            self.blocks.register_full_blocks(seq)
        return ready

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request wherever it is (running, waiting, or an abort of either)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq)
        if seq.adapter_key is not None:
            self.adapters.unpin(seq.adapter_key)


def _prefills_more_urgent(items: list[tuple[Sequence, int]], priority: int) -> bool:
    """Whether the step holds a prompt chunk (more than the one token of a decode) of a
    request more urgent than `priority`."""
    return any(n > 1 and seq.priority < priority for seq, n in items)
