"""The batch runner: OpenAI's Batch API as a job-like state machine over the file store,
its lines run behind interactive traffic (the statuses are in batch.py).

    <root>/batches/<tenant>/<batch id>.json            the batch, rewritten atomically when its status changes
    <root>/batches/<tenant>/<batch id>.output.jsonl    answered lines so far, appended as each one ends
    <root>/batches/<tenant>/<batch id>.errors.jsonl    failed lines so far
When a batch ends, the file store adopts the two partial files (a rename, no copy) as
files of purpose "batch_output": its output_file_id and error_file_id.

Lines are answered by the `requests` object the server hands in (api/batch_requests.py:
the routes' own code, at BATCH_PRIORITY), at most `max_concurrent_lines` at once over
all batches, on a thread with its own event loop, so the HTTP server's loop never waits
on a batch.

Restart: a batch that was validating or in progress resumes from the lines that are not
in its partial files (a line a crash tore is cut off and runs again); one that was
ending (finalizing, cancelling, failed) finishes ending. If its input file was deleted
meanwhile, it fails, and the lines it had answered stay in its output and error files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from typing import Protocol

from anyio import to_thread

from loraserve.adapters.durable import fsync_dir, write_file_atomic
from loraserve.adapters.files import BATCH, BATCH_OUTPUT, FileNotFound, FileStore, WrongFilePurpose

from .batch import (CANCELLABLE, ENDED, WINDOWS, Batch, BatchesStopped, BatchNotCancellable, BatchNotFound,
                    EngineStopped, Owner)
from .lines import BatchLine, answered, read_requests, unrun
from .partial_files import append_line, count_lines, read_lines

log = logging.getLogger(__name__)


class LineAnswerer(Protocol):
    """What answers a batch's lines: the server's own endpoint code (api/batch_requests.py)."""

    async def answer(self, endpoint: str, body: object, owner: Owner) -> tuple[int, dict]:
        """(HTTP status, response body) of one line, as the endpoint would answer it; an
        error body with code "engine_dead" means the engine stopped under it."""

    async def settle(self) -> None:
        """Return once every abort sent so far has reached the engine."""


class BatchManager:
    def __init__(self, root: str, files: FileStore, requests: LineAnswerer, max_concurrent_lines: int,
                 windows: dict[str, int] | None = None):
        self.files = files
        self.requests = requests
        self.max_concurrent_lines = max_concurrent_lines
        self.windows = windows or WINDOWS
        self.dir = os.path.join(root, "batches")
        self.tmp = os.path.join(root, "tmp")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        self._lock = threading.Lock()
        self._batches: dict[str, Batch] = {}        # creation order
        self._done: dict[str, set[str]] = {}        # batch id -> custom_ids in its partial files
        self._lines: dict[str, set[asyncio.Task]] = {}   # batch id -> its lines running now
        self._tasks: set[asyncio.Task] = set()      # one per batch being worked on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._closed = False
        unfinished = self._recover()
        for batch in unfinished:
            self._submit(batch)

    # -- the API -----------------------------------------------------------------------
    def create(self, caller, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict | None) -> Batch:
        """A new batch, validating, on disk; `start` sets it going. Its lines run with the
        rights of `caller` (anything with `tenant` and `admin`)."""
        now = int(time.time())
        batch = Batch(id=f"batch_{uuid.uuid4().hex[:24]}", tenant=caller.tenant, admin=caller.admin,
                      endpoint=endpoint, input_file_id=input_file_id, completion_window=completion_window,
                      created_at=now, expires_at=now + self.windows[completion_window], metadata=metadata)
        with self._lock:
            self._batches[batch.id] = batch
            self._done[batch.id] = set()
            self._persist(batch)
        return batch

    def start(self, batch: Batch) -> None:
        if self._closed:
            raise BatchesStopped("the batch runner has stopped (the server is shutting down); retry later")
        self._submit(batch)

    def get(self, tenant: str, batch_id: str) -> Batch:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None or batch.tenant != tenant:     # another tenant's batch: the same answer
            raise BatchNotFound(f"no batch {batch_id!r} for this tenant; GET /v1/batches lists yours", "batch_id")
        return batch

    def list(self, tenant: str) -> list[Batch]:
        """Newest first."""
        with self._lock:
            return [b for b in reversed(self._batches.values()) if b.tenant == tenant]

    def cancel(self, tenant: str, batch_id: str) -> Batch:
        """Stop a batch: its running lines are aborted (their KV blocks freed), the lines
        already answered stay in its files. Cancelling twice is harmless."""
        batch = self.get(tenant, batch_id)
        with self._lock:
            if batch.status in ("cancelling", "cancelled"):
                return batch
            if batch.status not in CANCELLABLE:
                raise BatchNotCancellable(f"batch {batch_id} is {batch.status}; only a validating or in-progress "
                                          "batch can be cancelled", "batch_id")
            batch.status, batch.cancelling_at = "cancelling", int(time.time())
            self._persist(batch)
            if not self._closed:        # else the next start finishes the cancel
                self._loop.call_soon_threadsafe(self._abort_lines, batch.id)
        return batch

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop working, as a crash would but tidily: running lines are aborted and not
        written, every unfinished batch stays on disk as it is and the next start resumes it."""
        with self._lock:
            if self._closed or self._thread is None:
                self._closed = True
                return
            self._closed = True
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    # -- the runner thread ---------------------------------------------------------------
    def _submit(self, batch: Batch) -> None:
        self._start_thread()
        self._loop.call_soon_threadsafe(self._start_batch, batch)

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="loraserve-batches",
                                                daemon=True)
                self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the batch runner thread did not start")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_concurrent_lines)
        self._ready.set()
        await self._stop.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.requests.settle()

    def _start_batch(self, batch: Batch) -> None:
        task = asyncio.create_task(self._run_batch(batch), name=batch.id)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: Batch) -> None:
        try:
            lines = await to_thread.run_sync(self._prepare, batch)
            if batch.status == "in_progress" and batch.outcome is None:
                await self._run_lines(batch, lines)
                if batch.status == "in_progress" and self._expired(batch):
                    await to_thread.run_sync(self._expire, batch, lines)
            await to_thread.run_sync(self._finalize, batch)
        except asyncio.CancelledError:
            raise               # shutdown: the batch stays as it is on disk; the next start resumes it
        except EngineStopped:
            log.warning("batch %s: the engine stopped; the next start resumes the batch", batch.id)
        except Exception as e:  # noqa: BLE001 - a batch must end, whatever broke
            log.exception("batch %s failed", batch.id)
            self._fail(batch, "internal_error", f"{type(e).__name__}: {e}")
            await to_thread.run_sync(self._finalize, batch)

    async def _run_lines(self, batch: Batch, lines: list[BatchLine]) -> None:
        owner = Owner(batch.tenant, batch.admin)
        running = self._lines.setdefault(batch.id, set())
        done = self._done[batch.id]
        broken: list[BaseException] = []      # what ended a line other than an answer or a cancel

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            if not task.cancelled() and task.exception() is not None:
                broken.append(task.exception())

        for line in lines:
            if line.custom_id in done:
                continue
            await self._slots.acquire()
            if batch.status != "in_progress" or self._expired(batch) or broken:
                self._slots.release()
                break
            task = asyncio.create_task(self._run_line(batch, line, owner))
            running.add(task)
            task.add_done_callback(finished)
        await asyncio.gather(*running, return_exceptions=True)
        if broken:
            raise next((e for e in broken if isinstance(e, EngineStopped)), broken[0])

    async def _run_line(self, batch: Batch, line: BatchLine, owner: Owner) -> None:
        try:
            status, body = await self.requests.answer(batch.endpoint, line.body, owner)
        finally:
            self._slots.release()
        if body.get("error", {}).get("code") == "engine_dead":
            raise EngineStopped()   # not this line's fault: it stays unanswered, for the next start
        self._record(batch, answered(line.custom_id, status, body), ok=status == 200)

    def _abort_lines(self, batch_id: str) -> None:
        for task in list(self._lines.get(batch_id, ())):
            task.cancel()

    def _expired(self, batch: Batch) -> bool:
        return time.time() >= batch.expires_at

    # -- steps, each on a worker thread ---------------------------------------------------
    def _prepare(self, batch: Batch) -> list[BatchLine]:
        """Read and check the input file, and what earlier runs answered; validating -> in_progress."""
        if batch.outcome is not None or batch.status not in ("validating", "in_progress"):
            return []                           # it was ending: finish that
        try:
            record = self.files.get(batch.tenant, batch.input_file_id, "input_file_id", BATCH)
            data = self.files.read(record)
        except (FileNotFound, WrongFilePurpose, FileNotFoundError):
            self._fail(batch, "file_not_found", f"the input file {batch.input_file_id} was deleted before the batch "
                                                "finished; the lines already answered are in its output and error "
                                                "files", "input_file_id")
            return []
        lines, errors = read_requests(data, batch.endpoint)
        with self._lock:
            if errors:
                batch.outcome, batch.errors = "failed", errors
                self._persist(batch)
                return []
            batch.total = len(lines)
            if batch.status == "validating":
                batch.status, batch.in_progress_at = "in_progress", int(time.time())
            self._persist(batch)
        return lines

    def _record(self, batch: Batch, entry: dict, ok: bool) -> None:
        """Append one finished line to its partial file, and count it."""
        append_line(self._partial(batch, "output" if ok else "errors"), entry)
        with self._lock:
            self._done[batch.id].add(entry["custom_id"])
            self._count(batch, entry, ok)

    def _count(self, batch: Batch, entry: dict, ok: bool) -> None:
        if not ok:
            batch.failed += 1
            return
        batch.completed += 1
        usage = entry["response"]["body"].get("usage") or {}
        batch.input_tokens += usage.get("prompt_tokens", 0)
        batch.output_tokens += usage.get("completion_tokens", 0)

    def _expire(self, batch: Batch, lines: list[BatchLine]) -> None:
        message = f"This request could not be executed before the completion window ({batch.completion_window}) expired."
        for line in lines:
            if line.custom_id not in self._done[batch.id]:
                self._record(batch, unrun(line.custom_id, "batch_expired", message), ok=False)
        with self._lock:
            batch.outcome = "expired"
            self._persist(batch)

    def _fail(self, batch: Batch, code: str, message: str, param: str | None = None) -> None:
        with self._lock:
            batch.outcome = "failed"
            batch.errors = [{"code": code, "message": message, "param": param, "line": None}]
            self._persist(batch)

    def _finalize(self, batch: Batch) -> None:
        """Hand the partial files to the file store, once, then show the last status."""
        with self._lock:
            if batch.outcome is None and batch.status in ("validating", "in_progress"):
                batch.status, batch.finalizing_at = "finalizing", int(time.time())
            if batch.result_ids is None:
                batch.result_ids = [f"file-{uuid.uuid4().hex[:24]}" for _ in range(2)]
            self._persist(batch)
        found = {}
        for kind, file_id in zip(("output", "errors"), batch.result_ids):
            path = self._partial(batch, kind)
            if not self.files.exists(batch.tenant, file_id) and os.path.exists(path):
                self.files.adopt(batch.tenant, file_id, f"{batch.id}_{kind}.jsonl", BATCH_OUTPUT, path,
                                 count_lines(path))
            found[kind] = file_id if self.files.exists(batch.tenant, file_id) else None
        with self._lock:
            batch.output_file_id, batch.error_file_id = found["output"], found["errors"]
            self._end(batch, batch.outcome or ENDED[batch.status])
            batch.finalized = True
            self._persist(batch)
            self._done.pop(batch.id, None)
            self._lines.pop(batch.id, None)

    # -- state -----------------------------------------------------------------------------
    def _end(self, batch: Batch, status: str) -> None:
        """Under the lock: the last status and its time."""
        batch.status = status
        setattr(batch, f"{status}_at", int(time.time()))

    def _partial(self, batch: Batch, kind: str) -> str:
        return os.path.join(self.dir, batch.tenant, f"{batch.id}.{kind}.jsonl")

    def _written(self, batch: Batch, kind: str) -> str:
        """Where a batch's answered lines of one kind are: its partial file, or, if a
        restart came between adopting it and the last status, the store's file."""
        file_id = batch.result_ids[kind == "errors"] if batch.result_ids else None
        if file_id is not None and self.files.exists(batch.tenant, file_id):
            return self.files.data_path(self.files.get(batch.tenant, file_id))
        return self._partial(batch, kind)

    def _persist(self, batch: Batch) -> None:
        folder = os.path.join(self.dir, batch.tenant)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            fsync_dir(self.dir)
        write_file_atomic(os.path.join(folder, f"{batch.id}.json"), json.dumps(dataclasses.asdict(batch)).encode(),
                          self.tmp)

    def _recover(self) -> list[Batch]:
        """Every batch on disk; returns the unfinished ones, their counts re-read from their partial files."""
        batches = []
        for tenant in sorted(os.listdir(self.dir)):
            for name in os.listdir(os.path.join(self.dir, tenant)):
                if name.endswith(".json"):
                    with open(os.path.join(self.dir, tenant, name), "rb") as f:
                        batches.append(Batch(**json.loads(f.read())))
        unfinished = []
        for batch in sorted(batches, key=lambda b: (b.created_at, b.id)):
            self._batches[batch.id] = batch
            if batch.finalized:
                continue
            batch.completed = batch.failed = batch.input_tokens = batch.output_tokens = 0
            self._done[batch.id] = set()
            for kind in ("output", "errors"):
                for entry in read_lines(self._written(batch, kind)):
                    self._done[batch.id].add(entry["custom_id"])
                    self._count(batch, entry, ok=kind == "output")
            unfinished.append(batch)
        return unfinished

