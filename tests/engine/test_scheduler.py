"""Continuous batching with plain sequences and a fake adapter pool: no model, no torch."""

from collections import Counter

from loraserve.adapters.pin import Pin
from loraserve.block_manager import BlockManager
from loraserve.scheduler import Scheduler
from loraserve.sequence import Sequence, SequenceStatus


class FakePins:
    """At most `slots` distinct adapters pinned at once; keys in `loading` never pin."""

    def __init__(self, slots=2, loading=()):
        self.slots, self.loading, self.pins = slots, set(loading), Counter()

    def try_pin(self, key):
        if key in self.loading:
            return Pin.LOADING
        if key not in self.pins and len(self.pins) >= self.slots:
            return Pin.NO_SLOT
        self.pins[key] += 1
        return Pin.PINNED

    def is_pinned(self, key):
        return key in self.pins

    def unpin(self, key):
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]


def make(num_blocks=64, block_size=4, max_seqs=8, max_tokens=64, pins=None):
    pins = pins or FakePins()
    return Scheduler(BlockManager(num_blocks, block_size), pins, max_seqs, max_tokens), pins


def seq(i, n, adapter=None):
    return Sequence(i, list(range(i * 100, i * 100 + n)), params=None, adapter_key=adapter)


def step(sched: Scheduler, sample=True):
    """One step: schedule, mark computed, append a token to sequences that finished their context."""
    batch = sched.schedule()
    for s in sched.advance(batch):
        if sample:
            s.output_token_ids.append(7)
    return batch


def test_new_requests_join_running_ones_between_steps():
    sched, _ = make()
    a = seq(1, 5)
    sched.add(a)
    assert [n for _, n in step(sched).items] == [5]
    b = seq(2, 3)
    sched.add(b)
    batch = step(sched)
    assert [(s.seq_id, n) for s, n in batch.items] == [(1, 1), (2, 3)]


def test_token_budget_chunks_long_prompts():
    sched, _ = make(max_tokens=8)
    a = seq(1, 20)
    sched.add(a)
    sizes = [step(sched).items[0][1] for _ in range(3)]
    assert sizes == [8, 8, 4]
    assert a.num_computed_tokens == 20 and len(a.output_token_ids) == 1


def test_max_num_seqs_caps_running():
    sched, _ = make(max_seqs=2)
    for i in range(4):
        sched.add(seq(i, 2))
    step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 2


def test_preempts_newest_when_blocks_run_out_and_it_resumes():
    sched, _ = make(num_blocks=4, block_size=4)
    a, b = seq(1, 7), seq(2, 7)
    sched.add(a)
    sched.add(b)
    step(sched)                               # each holds 2 blocks
    for _ in range(3):
        step(sched)
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    sched.finish(a, "length")
    while b.status is not SequenceStatus.RUNNING or b.num_computed_tokens < b.num_tokens - 1:
        step(sched)
    assert b.num_computed_tokens == b.num_tokens - 1    # recomputed prompt + its earlier outputs


def test_at_most_max_loras_distinct_adapters_per_step():
    sched, pins = make(pins=FakePins(slots=2))
    for i, adapter in enumerate(["a", "b", "c", "a", None]):
        sched.add(seq(i, 2, adapter))
    batch = step(sched)
    adapters = {s.adapter_key for s, _ in batch.items if s.adapter_key}
    assert adapters == {"a", "b"}
    # c found every slot pinned and waits; a later request for the pinned adapter a
    # costs no slot and joins, and so does the base-model request
    assert [s.adapter_key for s in sched.waiting] == ["c"]
    assert sorted(str(s.adapter_key) for s, _ in batch.items) == ["None", "a", "a", "b"]


def test_an_adapter_waiting_for_a_slot_is_not_starved():
    """Steady traffic for resident adapters must not keep a third adapter out forever."""
    sched, pins = make(max_seqs=8, pins=FakePins(slots=2))
    for i in range(4):
        sched.add(seq(i, 2, "ab"[i % 2]))
    step(sched)
    late = seq(99, 2, "c")
    sched.add(late)
    for i in range(40):
        sched.add(seq(100 + i, 2, "ab"[i % 2]))             # more traffic for a and b
        step(sched)
        for s in list(sched.running):
            if len(s.output_token_ids) >= 3:
                sched.finish(s, "length")
        if late.status is SequenceStatus.RUNNING:
            break
    assert late.status is SequenceStatus.RUNNING, "the adapter that waited longest never got a slot"
    assert i <= sched.max_slot_wait_steps + 5


def test_loading_adapter_does_not_block_resident_ones():
    sched, _ = make(pins=FakePins(slots=4, loading={"slow"}))
    sched.add(seq(1, 2, "slow"))
    sched.add(seq(2, 2, "fast"))
    batch = step(sched)
    assert [s.adapter_key for s, _ in batch.items] == ["fast"]
    assert sched.waiting[0].adapter_key == "slow"


def test_finish_releases_blocks_and_pins():
    sched, pins = make()
    a = seq(1, 6, "a")
    sched.add(a)
    step(sched)
    assert pins.pins["a"] == 1
    sched.finish(a, "stop")
    assert not pins.pins and sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert a.is_finished and a.finish_reason == "stop"


def test_abort_of_a_waiting_request():
    sched, _ = make(max_seqs=1)
    a, b = seq(1, 2), seq(2, 2)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(b, "abort")
    assert not sched.waiting and b.is_finished
