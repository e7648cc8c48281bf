"""A batch's partial result files: JSONL appended one whole line per finished request.

A crash can tear only the last line; reading cuts it off, so that request runs again.
"""

from __future__ import annotations

import json


def append_line(path: str, entry: dict) -> None:
    """One finished request, compact, as one whole line."""
    with open(path, "ab") as f:
        f.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")


def read_lines(path: str) -> list[dict]:
    """The whole lines of a partial file; a torn last line (a crash mid-write) is cut off."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    entries, good = [], 0
    for raw in data.splitlines(keepends=True):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("torn")
            entries.append(json.loads(raw))
        except ValueError:
            break
        good += len(raw)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return entries


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)
