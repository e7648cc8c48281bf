"""Run the app under uvicorn; SIGTERM drains: stop accepting, let running requests
finish (at most --drain-timeout seconds, then abort them), exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Callable

import uvicorn

from loraserve.engine_client import EngineClient
from loraserve.engine_stats import EngineStats

from .app import build_app
from .settings import ServerSettings, is_loopback

log = logging.getLogger("loraserve.api")


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, with a drain hook, and no re-raised signal at the end
    (uvicorn re-raises SIGTERM after shutting down, which would exit with 143, not 0)."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None]):
        super().__init__(config)
        self.on_drain = on_drain

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self.should_exit:                   # a second signal: stop waiting for requests
            self.force_exit = True
            return
        log.info("%s: draining (no new requests; running ones get up to %.0f s to finish)",
                 signal.Signals(sig).name, self.config.timeout_graceful_shutdown or 0)
        self.on_drain()
        self.should_exit = True


def startup_summary(engine: EngineClient, stats: EngineStats, settings: ServerSettings) -> list[str]:
    c = engine.config
    lines = [
        f"loraserve listening on http://{settings.host}:{settings.port} (OpenAI API under /v1, docs at /docs)",
        f"model {engine.model_id}: context {engine.max_model_len} tokens, {stats.kv_blocks_total} KV blocks of "
        f"{c.block_size} tokens, max {c.max_num_seqs} running requests"
        + (f" + a queue of {settings.max_queue}" if settings.max_queue is not None else ""),
        f"adapters: {stats.adapter_slots_total} device slots of rank <= {c.max_lora_rank}, "
        f"{c.max_cpu_loras} in the CPU cache, store at {engine.store.root}",
    ]
    if settings.api_keys:
        lines.append(f"auth: API keys from {settings.api_keys} (re-read when it changes)")
    elif is_loopback(settings.host):
        lines.append("auth: OPEN, no --api-keys: every caller is the admin of tenant 'default' (loopback only)")
    else:
        lines.append(f"auth: OPEN on {settings.host} (--allow-unauthenticated): anyone who reaches it is admin")
    return lines


def run_server(engine: EngineClient, settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT; the caller owns (and shuts down) the engine."""
    settings.check_exposure()
    app = build_app(engine, settings)
    admission = app.state.ctx.admission
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=settings.drain_timeout)
    server = DrainingServer(config, on_drain=lambda: setattr(admission, "draining", True))
    for line in startup_summary(engine, asyncio.run(engine.stats()), settings):
        log.info(line)
    server.run()
    if app.state.ctx.batches is not None:
        app.state.ctx.batches.shutdown()     # before the engine stops: unfinished lines resume at the next start
    log.info("stopped")
    return 0 if server.started else 1
