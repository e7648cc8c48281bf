"""Crash-safe file writes: data is on disk before a rename makes it visible.

POSIX rename is atomic, but without fsync a crash can leave a renamed file empty;
so the order is always write, fsync the file, rename, fsync the directory.
"""

from __future__ import annotations

import os
import tempfile


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (a rename or unlink inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write a new file and fsync it; the caller renames it into place."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file_atomic(path: str | os.PathLike, data: bytes, tmp_dir: str | os.PathLike) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a part.

    `tmp_dir` must be on the same filesystem as `path`; a crash leaves at most a stray
    temp file there, which the owner of `tmp_dir` sweeps on start-up.
    """
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception:
        _remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
