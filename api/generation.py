"""The engine requests behind one API request (one per prompt and choice), merged into
one stream of (choice index, RequestOutput) in arrival order.

Each engine request is pumped by its own task into a shared queue, so n choices run
concurrently in the engine's batches. Closing the group (normally, on error, or because
the client went away and its task was cancelled) cancels the pumps, which closes each
engine stream and so aborts its request: its KV blocks and adapter pin are freed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from loraserve.outputs import RequestOutput
from loraserve.prepared import PreparedPrompt
from loraserve.sampling_params import SamplingParams

from .errors import APIError, from_exception
from .metrics import RequestTimer
from .model_names import Target

_DONE = object()


@dataclass
class Choice:
    """One engine request: its prompt, and the newest snapshot of its output."""
    index: int
    prompt: PreparedPrompt
    params: SamplingParams
    out: RequestOutput | None = None
    timer: RequestTimer | None = None
    num_sent_tokens: int = 0   # tokens already reported in a stream (for streamed logprobs)

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.prompt_ids


@dataclass
class Group:
    request_id: str
    target: Target
    choices: list[Choice]
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _buffer: list = field(default_factory=list)

    def start(self, engine, metrics, arrival: float) -> None:
        for c in self.choices:
            key = self.target.record.key if self.target.record is not None else None
            c.timer = metrics.timer(self.target.label, arrival, key)
            self._tasks.append(asyncio.create_task(self._pump(engine, c)))

    async def _pump(self, engine, c: Choice) -> None:
        try:
            async for out in engine.generate(c.prompt, c.params, request_id=f"{self.request_id}-{c.index}"):
                self._queue.put_nowait((c, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:   # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((c, e))
        self._queue.put_nowait((c, _DONE))

    async def first_outputs(self) -> None:
        """Wait until every choice has produced output (or the first error, raised as an
        APIError): a stream then starts with a 200 only when the request was accepted."""
        seen = set()
        while len(seen) < len(self.choices):
            item = await self._next()
            self._buffer.append(item)
            seen.add(item[0].index)

    async def _next(self):
        c, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise from_exception(item)
        if item is not _DONE:
            if item.finish_reason in ("abort", "error"):
                raise APIError(500, f"the engine failed this request ({item.error or item.finish_reason}); other "
                                    "requests are unaffected, retry it", code="engine_error")
            c.out = item
            c.timer.on_output(item)
        return c, item

    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each snapshot as it comes; ends when every choice has finished."""
        remaining = len(self.choices)
        while remaining:
            c, item = self._buffer.pop(0) if self._buffer else await self._next()
            if item is _DONE:
                remaining -= 1
                continue
            yield c, item

    async def run_to_end(self) -> list[Choice]:
        async for _ in self.outputs():
            pass
        return self.choices

    def close(self) -> None:
        """Abort what is unfinished: cancelling a pump closes its engine stream, which aborts
        its request (also one cancelled while being added). Synchronous, so it also runs
        inside a cancelled task."""
        for t in self._tasks:
            t.cancel()


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def until_disconnect(request: Request, coro, poll_s: float = 0.2):
    """Run coro, cancelling it when the client disconnects (a plain response has no other
    way to notice: nothing is sent until the end)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

