"""Helpers for the fine-tuning tests: API keys for two tenants, JSONL files, uploads, and
bounded waits for a job. The live server is tests/livekit.py's, shared with tests/api.
"""

from __future__ import annotations

import json
import time

import httpx

from loraserve.api.keys import create_key

TERMINAL = ("succeeded", "failed", "cancelled")


def tenant_keys(path: str) -> dict[str, str]:
    """{tenant: key} for acme and beta, in a key file at `path`."""
    return {tenant: create_key(path, tenant)[0] for tenant in ("acme", "beta")}


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
