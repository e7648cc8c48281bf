"""Helpers for the fine-tuning tests: a live server on a free loopback port (a thread),
API keys for two tenants, JSONL files, and bounded waits for a job.

(tests/api/livekit.py is not importable from this folder: its directory is on sys.path
only when tests there run, so the little server helper is repeated here.)
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import uvicorn

from loraserve.api import ServerSettings, build_app
from loraserve.api.keys import create_key

TERMINAL = ("succeeded", "failed", "cancelled")


@contextlib.contextmanager
def live_server(engine, settings: ServerSettings):
    app = build_app(engine, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    app.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield app
    finally:
        if app.state.ctx.jobs is not None:
            app.state.ctx.jobs.shutdown()
        server.should_exit = True
        thread.join(15)
        sock.close()


def tenant_keys(path: str) -> dict[str, str]:
    """{tenant: key} for acme and beta, in a key file at `path`."""
    return {tenant: create_key(path, tenant)[0] for tenant in ("acme", "beta")}


def client(app, key: str) -> httpx.Client:
    return httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def chat_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def upload(c: httpx.Client, data: bytes, purpose: str = "fine-tune", filename: str = "train.jsonl"):
    return c.post("/v1/files", data={"purpose": purpose}, files={"file": (filename, data, "application/jsonl")})


def wait_status(get_status, wanted: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = get_status()
    while status not in wanted and time.monotonic() < deadline:
        time.sleep(0.25)
        status = get_status()
    return status
