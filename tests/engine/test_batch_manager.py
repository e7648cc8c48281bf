"""The batch state machine with a fake request runner (no engine, no server): the crash
windows a live test cannot hit on purpose, and an engine that stops under a batch."""

from __future__ import annotations

import json
import os

from livekit import wait_until

from loraserve.adapters.files import FileStore
from loraserve.batches import BatchManager, Owner

ACME = Owner("acme", False)


class FakeRequests:
    """Answers every line 200 with its body echoed, or as a stopped engine would."""

    def __init__(self, engine_dead: bool = False):
        self.engine_dead = engine_dead
        self.num_answered = 0

    async def answer(self, endpoint, body, owner):
        if self.engine_dead:
            return 503, {"error": {"message": "the engine has stopped", "type": "service_unavailable",
                                   "param": None, "code": "engine_dead"}}
        self.num_answered += 1
        return 200, {"id": f"chatcmpl-{body['n']}", "echo": body,
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    async def settle(self):
        pass


def lines(n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"n": i}}) + "\n" for i in range(n)).encode()


def manager(root: str, requests: FakeRequests) -> BatchManager:
    return BatchManager(root, FileStore(root, 1 << 20), requests, max_concurrent_lines=2)


def start(m: BatchManager, n: int):
    f = m.files.add("acme", "in.jsonl", "batch", lines(n))
    batch = m.create(ACME, f.id, "/v1/chat/completions", "24h", None)
    m.start(batch)
    return batch


def test_a_restart_between_adopting_the_files_and_the_last_status_keeps_the_counts(tmp_path):
    root = str(tmp_path)
    first = manager(root, FakeRequests())
    batch = start(first, 5)
    assert wait_until(lambda: first.get("acme", batch.id).status == "completed", 10)
    first.shutdown()
    path = os.path.join(root, "batches", "acme", f"{batch.id}.json")
    state = json.loads(open(path).read())
    assert state["output_file_id"] == state["result_ids"][0] and state["completed"] == 5
    state.update(status="finalizing", finalized=False, output_file_id=None, completed_at=None)
    with open(path, "w") as f:      # as written just before the crash: files adopted, status not yet
        f.write(json.dumps(state))
    again = manager(root, FakeRequests())
    try:
        assert wait_until(lambda: again.get("acme", batch.id).status == "completed", 10)
        done = again.get("acme", batch.id).to_openai()
        assert done["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
        assert done["output_file_id"] == state["result_ids"][0] and done["usage"]["output_tokens"] == 10
        assert again.requests.num_answered == 0           # nothing ran twice
    finally:
        again.shutdown()


def test_an_engine_that_stops_leaves_the_batch_to_the_next_start(tmp_path):
    root = str(tmp_path)
    dead = manager(root, FakeRequests(engine_dead=True))
    batch = start(dead, 4)
    assert wait_until(lambda: not dead._tasks and dead.get("acme", batch.id).status == "in_progress", 10)
    assert not os.path.exists(os.path.join(root, "batches", "acme", f"{batch.id}.errors.jsonl"))
    dead.shutdown()
    healthy = manager(root, FakeRequests())
    try:
        assert wait_until(lambda: healthy.get("acme", batch.id).status == "completed", 10)
        counts = healthy.get("acme", batch.id).to_openai()["request_counts"]
        assert counts == {"total": 4, "completed": 4, "failed": 0} and healthy.requests.num_answered == 4
    finally:
        healthy.shutdown()
