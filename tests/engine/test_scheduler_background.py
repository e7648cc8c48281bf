"""The background cap with plain sequences: while interactive work is about, Batch API
lines take at most max_background_tokens of a step, none of a step that prefills an
interactive prompt (unless the step before held them out too), and keep moving; without
it they run at full speed."""

from schedkit import AnyAdapter, step
from schedkit import prompt_seq as seq

from loraserve.adapters.pin import Pin
from loraserve.block_manager import BlockManager
from loraserve.scheduler import BATCH_PRIORITY, INTERACTIVE_PRIORITY, Scheduler
from loraserve.sequence import Sequence


def make(cap=4, hold=0, max_seqs=16, max_tokens=64) -> Scheduler:
    return Scheduler(BlockManager(256, 4), AnyAdapter(), max_seqs, max_tokens, max_background_tokens=cap,
                     background_hold_steps=hold)


def background_tokens(batch) -> int:
    return sum(n for s, n in batch.items if s.priority == BATCH_PRIORITY)


def decoding_batch_lines(sched: Scheduler, count: int) -> list[Sequence]:
    lines = [seq(i, 3, BATCH_PRIORITY) for i in range(count)]
    for line in lines:
        sched.add(line)
    step(sched)                     # every prompt prefilled: each line now decodes
    return lines


def test_without_interactive_work_every_batch_line_runs_each_step():
    sched = make(cap=2)
    decoding_batch_lines(sched, 8)
    batch = step(sched)
    assert background_tokens(batch) == 8 and len(batch.items) == 8


def test_an_interactive_prefill_step_carries_no_batch_tokens_and_the_next_step_the_cap():
    sched = make(cap=2)
    lines = decoding_batch_lines(sched, 8)
    sched.add(seq(50, 20, INTERACTIVE_PRIORITY))
    batch = step(sched)
    assert [(s.seq_id, n) for s, n in batch.items] == [(50, 20)]     # the interactive request's TTFT step
    batch = step(sched)
    assert [(s.seq_id, n) for s, n in batch.items] == [(50, 1), (lines[0].seq_id, 1), (lines[1].seq_id, 1)]


class NoSlot(AnyAdapter):
    """Adapter "busy" never pins: a request for it waits for a slot."""

    def try_pin(self, key):
        return Pin.NO_SLOT if key == "busy" else super().try_pin(key)


def test_batch_lines_are_not_held_for_an_interactive_prompt_that_cannot_start():
    sched = Scheduler(BlockManager(256, 4), NoSlot(), 16, 64, max_background_tokens=2)
    decoding_batch_lines(sched, 4)
    waiting = seq(50, 20, INTERACTIVE_PRIORITY)
    waiting.adapter_key = "busy"
    sched.add(waiting)
    batch = step(sched)
    assert background_tokens(batch) == 2 and waiting in sched.waiting


def test_while_an_interactive_request_decodes_batch_prompts_are_chunked_to_the_cap():
    sched = make(cap=3)
    sched.add(seq(50, 5, INTERACTIVE_PRIORITY))
    step(sched)
    sched.add(seq(1, 10, BATCH_PRIORITY))
    chunks = [background_tokens(step(sched)) for _ in range(4)]
    assert chunks == [3, 3, 3, 1]                                # 10 prompt tokens, 3 a step
    assert background_tokens(step(sched)) == 1                   # then it decodes


def test_batch_lines_keep_moving_under_continuous_interactive_load():
    sched = make(cap=1)
    lines = decoding_batch_lines(sched, 4)
    done = {line.seq_id: line.num_computed_tokens for line in lines}
    moved = []
    for i in range(40):             # a new interactive prompt in every step
        sched.add(seq(100 + i, 4, INTERACTIVE_PRIORITY))
        moved.append(background_tokens(step(sched)))
        for s in [s for s in sched.running if s.priority == INTERACTIVE_PRIORITY and s.output_token_ids]:
            sched.finish(s, "length")
    assert moved == [0, 1] * 20     # held out of a prefill step only when the step before was not
    assert sum(line.num_computed_tokens - done[line.seq_id] for line in lines) == 20


def test_the_cap_holds_for_the_hold_steps_after_the_interactive_request_then_lifts():
    sched = make(cap=2, hold=3)
    decoding_batch_lines(sched, 6)
    interactive = seq(50, 4, INTERACTIVE_PRIORITY)
    sched.add(interactive)
    step(sched)
    sched.finish(interactive, "stop")
    after = [background_tokens(step(sched)) for _ in range(5)]
    assert after == [2, 2, 2, 6, 6]


def test_cap_zero_is_off():
    sched = make(cap=0)
    decoding_batch_lines(sched, 8)
    sched.add(seq(50, 20, INTERACTIVE_PRIORITY))
    assert background_tokens(step(sched)) == 8


def test_interactive_requests_are_never_capped():
    sched = make(cap=1)
    decoding_batch_lines(sched, 2)
    for i in range(3):
        sched.add(seq(50 + i, 10, INTERACTIVE_PRIORITY))
    batch = step(sched)
    assert [n for s, n in batch.items if s.priority == INTERACTIVE_PRIORITY] == [10, 10, 10]
    assert background_tokens(batch) == 0                        # a prefill step: held out
    batch = step(sched)
    assert [n for s, n in batch.items if s.priority == INTERACTIVE_PRIORITY] == [1, 1, 1]
    assert background_tokens(batch) == 1
