"""Scheduling priorities with plain sequences: Batch API lines (BATCH_PRIORITY) run behind
interactive requests, and give way to them, without ever holding them up."""

from schedkit import AnyAdapter, prompt_seq, step

from loraserve.block_manager import BlockManager
from loraserve.scheduler import BATCH_PRIORITY, INTERACTIVE_PRIORITY, Scheduler
from loraserve.sequence import SequenceStatus


def make(num_blocks=64, block_size=4, max_seqs=8, max_tokens=64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), AnyAdapter(), max_seqs, max_tokens)


def batch_seq(i, n):
    return prompt_seq(i, n, BATCH_PRIORITY)


def interactive_seq(i, n):
    return prompt_seq(i, n, INTERACTIVE_PRIORITY)


def ids(items) -> list[int]:
    return [s.seq_id for s, _ in items]


def test_interactive_requests_queue_ahead_of_waiting_batch_lines():
    sched = make(max_seqs=1)
    for i in (1, 2):
        sched.add(batch_seq(i, 3))
    sched.add(interactive_seq(3, 3))
    sched.add(interactive_seq(4, 3))
    assert [s.seq_id for s in sched.waiting] == [3, 4, 1, 2]    # by priority, then arrival
    assert ids(step(sched).items) == [3]


def test_an_interactive_request_preempts_the_newest_batch_line_when_no_place_is_free():
    sched = make(max_seqs=2)
    old, new = batch_seq(1, 3), batch_seq(2, 3)
    sched.add(old)
    sched.add(new)
    step(sched)
    urgent = interactive_seq(3, 3)
    sched.add(urgent)
    batch = step(sched)
    assert ids(batch.items) == [1, 3] and batch.num_preempted == 1
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_preemptions == 1
    sched.finish(urgent, "stop")
    step(sched)                                        # the preempted line resumes by recompute
    assert new.status is SequenceStatus.RUNNING and new.num_computed_tokens == new.num_tokens - 1


def test_an_interactive_request_preempts_batch_lines_holding_the_kv_blocks():
    sched = make(num_blocks=4, block_size=4)
    lines = [batch_seq(1, 7), batch_seq(2, 7)]        # 2 blocks each: the pool is full
    for s in lines:
        sched.add(s)
    step(sched)
    assert sched.blocks.num_free_blocks == 0
    urgent = interactive_seq(3, 6)
    sched.add(urgent)
    batch = step(sched)
    assert 3 in ids(batch.items) and urgent.status is SequenceStatus.RUNNING
    assert lines[1].num_preemptions == 1 and lines[0].num_preemptions == 0    # the newest gave way


def test_batch_lines_never_preempt_interactive_requests():
    sched = make(max_seqs=2, num_blocks=4, block_size=4)
    running = [interactive_seq(1, 7), interactive_seq(2, 7)]
    for s in running:
        sched.add(s)
    step(sched)
    sched.add(batch_seq(3, 3))
    batch = step(sched)
    assert ids(batch.items) == [1, 2] and batch.num_preempted == 0
    assert all(s.num_preemptions == 0 for s in running)


def test_running_interactive_requests_claim_the_token_budget_first():
    sched = make(max_tokens=8)
    line = batch_seq(1, 12)
    sched.add(line)
    step(sched)                                        # 8 of the line's 12 prompt tokens
    urgent = interactive_seq(2, 20)
    sched.add(urgent)
    step(sched)                                        # the line's last 4, and 4 of the urgent prompt
    assert urgent.status is SequenceStatus.RUNNING and line.num_computed_tokens == 12
    batch = step(sched)                                # both want tokens: the urgent one comes first
    assert batch.items == [(urgent, 8)]


def test_no_batch_line_joins_the_step_that_prefills_an_interactive_request():
    sched = make()
    urgent, line = interactive_seq(1, 6), batch_seq(2, 3)
    sched.add(line)
    sched.add(urgent)
    assert ids(step(sched).items) == [1]               # budget to spare, but the line waits
    assert ids(step(sched).items) == [1, 2]            # the urgent one decodes: the line may join


def test_a_preempted_batch_line_waits_behind_interactive_requests_but_ahead_of_other_lines():
    sched = make(max_seqs=1)
    line = batch_seq(1, 3)
    sched.add(line)
    step(sched)
    sched.add(batch_seq(2, 3))
    sched.add(interactive_seq(3, 3))
    sched.add(interactive_seq(4, 3))
    step(sched)
    assert line.status is SequenceStatus.WAITING
    assert [s.seq_id for s in sched.waiting] == [4, 1, 2]
