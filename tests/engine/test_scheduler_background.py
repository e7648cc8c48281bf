"""The background cap with plain sequences: while interactive work is about, Batch API
lines take at most max_background_tokens of a step, and keep moving; without it they
run at full speed."""

from schedkit import AnyAdapter, step
from schedkit import prompt_seq as seq

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


def test_an_interactive_prefill_step_carries_at_most_the_cap_of_batch_tokens():
    sched = make(cap=2)
    lines = decoding_batch_lines(sched, 8)
    sched.add(seq(50, 20, INTERACTIVE_PRIORITY))
    batch = step(sched)
    assert [(s.seq_id, n) for s, n in batch.items if s.priority == INTERACTIVE_PRIORITY] == [(50, 20)]
    assert background_tokens(batch) == 2
    assert [s for s, _ in batch.items if s.priority == BATCH_PRIORITY] == lines[:2]   # the oldest take the cap


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
    for i in range(40):             # an interactive request in every step, one after another
        if not any(s.priority == INTERACTIVE_PRIORITY for s in sched.running):
            sched.add(seq(100 + i, 4, INTERACTIVE_PRIORITY))
        batch = step(sched)
        assert background_tokens(batch) == 1
        for s in [s for s in sched.running if s.priority == INTERACTIVE_PRIORITY and len(s.output_token_ids) >= 2]:
            sched.finish(s, "length")
    assert all(line.num_computed_tokens > done[line.seq_id] for line in lines[:1])
    assert sum(line.num_computed_tokens - done[line.seq_id] for line in lines) == 40


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
    assert background_tokens(batch) == 1
