"""A live uvicorn server on a free 127.0.0.1 port, in a background thread, for the tests
that talk HTTP (tests/api, tests/finetune); a tiny engine to put behind it; bounded waits;
and `StepGate`, which lets a test decide when the engine steps.

A module of its own at tests/ level (like lorakit.py), not conftest: tests/conftest.py's
folder is on sys.path for every test folder. Every wait is bounded and the server always
stops, even when a test fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from loraserve.api import ServerSettings, build_app


class LiveServer:
    def __init__(self, engine, settings: ServerSettings):
        self.engine = engine
        self.app = build_app(engine, settings)
        self.ctx = self.app.state.ctx
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 30.0) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.ctx.jobs is not None:       # fine-tuning workers are processes: end them first
            self.ctx.jobs.shutdown()
        if self.ctx.batches is not None:    # so is the Batch API's runner thread
            self.ctx.batches.shutdown()
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def metric(self, name: str, key: str | None = None, **labels: str) -> float | None:
        """The value of the sample `name` whose labels include `labels`, from /metrics; None when absent."""
        with self.client(key) as c:
            text = c.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None


@contextlib.contextmanager
def live_server(engine, settings: ServerSettings | None = None):
    server = LiveServer(engine, settings or ServerSettings()).start()
    try:
        yield server
    finally:
        server.stop()


def tiny_engine(base_dir: str, adapter_dir: str, **overrides):
    from loraserve import EngineConfig
    from loraserve.async_engine import AsyncEngine

    config = dict(model=base_dir, dtype="float32", max_loras=2, max_lora_rank=64, max_model_len=128,
                  adapter_dir=adapter_dir, num_kv_blocks=64)
    config.update(overrides)
    return AsyncEngine(EngineConfig(**config))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class StepGate:
    """Engine steps that run only when the test lets them: `allow(n)` lets n more through,
    `open()` lets all through. Tests order events with it instead of timing them: while the
    gate is shut the engine makes no progress, so whatever the server answers meanwhile
    was answered without waiting for generation. The engine loop still runs its commands
    (stats, aborts): to it, a shut gate looks like an engine with nothing to do."""

    def __init__(self, core):
        self.hooks = core.hooks         # through the engine's public seam (loraserve/hooks.py)
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()
        self.num_steps = 0              # steps the engine has run through the gate
        self.hooks.may_step = self._may_step

    def _may_step(self) -> bool:
        allowed = self.opened.is_set() or self.permits.acquire(blocking=False)
        self.num_steps += allowed
        return allowed

    def allow(self, steps: int) -> None:
        self.permits.release(steps)

    def open(self) -> None:
        self.opened.set()

    def close(self) -> None:
        """Let the engine step freely again."""
        self.open()
        self.hooks.may_step = None

    def __enter__(self) -> "StepGate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
