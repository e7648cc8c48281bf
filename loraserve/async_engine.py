"""The engine loop on its own thread, streaming per-request deltas to asyncio callers.

The loop thread owns the LLMEngine: callers never touch it directly, they post
commands (add, abort, any callable) to a thread-safe queue, and outputs travel back
through each request's asyncio queue via `call_soon_threadsafe`. A caller that stops
listening (a client disconnect cancels its task) aborts its request, which frees its
KV blocks and adapter pin.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from loraserve.adapters import AdapterRecord

from .config import EngineConfig
from .engine import DEFAULT_TENANT, LLMEngine
from .engine_stats import EngineStats
from .outputs import RequestOutput
from .prepared import PreparedPrompt
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:    # the caller's event loop has closed: nobody listens, and the engine goes on
            pass


class AsyncEngine:
    """The one-process EngineClient (engine_client.py). `engine` is the LLMEngine; only the
    loop thread calls its methods."""

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine = engine or LLMEngine(config or EngineConfig())
        self.model_id, self.model_dir, self.tokenizer = engine.model_id, engine.model_dir, engine.tokenizer
        self.vocab_size = engine.hf_config.vocab_size
        self.config = engine.config
        self.max_model_len = engine.max_model_len
        self.store = engine.store
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: BaseException | None = None
        self.num_steps = 0
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # -- the caller's side ---------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the loop thread between steps; returns its result or raises."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run():
            try:
                result = fn(self.engine)
                loop.call_soon_threadsafe(_resolve, future, result, None)
            except BaseException as e:   # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_resolve, future, None, e)

        self._post(run)
        return await future

    def prepare(self, prompt: str | list[int], adapter: str | AdapterRecord | None = None,
                tenant: str = DEFAULT_TENANT) -> PreparedPrompt:
        return self.engine.prepare(prompt, adapter, tenant)     # reads fixed facts and the store only

    async def generate(self, prompt: PreparedPrompt | str | list[int], params: SamplingParams,
                       adapter: str | None = None, request_id: str | None = None, tenant: str = DEFAULT_TENANT,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput each time the request advances; the last is finished.
        `prompt` is prepared, or prepared here with `adapter` (a store reference in the
        tenant's view); `priority` is the scheduler's (lower first). Invalid requests
        raise before the first yield; a caller that stops early aborts the request."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.prepare(prompt, adapter, tenant)

        def add(engine: LLMEngine):
            engine.add_request(prompt, params, request_id=request_id, priority=priority)
            self._streams[request_id] = stream

        try:
            await self.call(add)
        except asyncio.CancelledError:  # the add may still run on the loop: abort after it
            self.abort(request_id)
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def stats(self) -> EngineStats:
        return await self.call(lambda engine: engine.stats())

    async def adapter_tiers(self, records: list[AdapterRecord]) -> list[str]:
        return await self.call(lambda engine: [engine.adapter_tier(r) for r in records])

    async def remove_adapter(self, ref: str, tenant: str) -> list[AdapterRecord]:
        return await self.call(lambda engine: engine.remove_adapter(ref, tenant))

    async def adopt_adapter(self, record: AdapterRecord, blob_id: str) -> None:
        await self.call(lambda engine: engine.adopt_adapter(record, blob_id))

    async def drop_adapter(self, record: AdapterRecord) -> None:
        await self.call(lambda engine: engine.drop_adapter(record))

    async def settle(self) -> None:
        """Commands run in order: once this one has, every abort sent before it has too."""
        await self.call(lambda engine: None)

    def abort(self, request_id: str) -> None:
        def run():
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)
        self._post(run)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _post(self, fn: Callable[[], None]) -> None:
        if not self.alive:
            raise EngineDeadError(f"the engine loop has stopped: {self.error!r}")
        self._commands.put(fn)
        self._wake.set()

    # -- the loop thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            if not self.engine.has_unfinished() or not self._may_step():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step().outputs   # fails only the requests a fault touches
            except Exception as e:                  # the engine's own bookkeeping broke
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self.num_steps += 1
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(_snapshot(out))
                    if out.finished:
                        del self._streams[out.request_id]

    def _may_step(self) -> bool:
        may_step = self.engine.hooks.may_step
        return may_step is None or may_step()

    def _run_commands(self) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            fn()

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(RuntimeError(f"request failed inside the engine: {error}"))


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the caller may keep while the engine keeps appending to the original."""
    return RequestOutput(**{**out.__dict__, "token_ids": list(out.token_ids),
                            "logprobs": None if out.logprobs is None else list(out.logprobs)})
