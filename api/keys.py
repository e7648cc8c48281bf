"""The API key file: keys stored as sha256 hashes (never in clear), each mapped to a tenant.

    {"format": 1, "keys": [{"id": "key-3f2a9c1d", "tenant": "acme", "admin": false,
                            "sha256": "<hex of sha256(key)>", "created_at": 1718000000.0}]}

A key is 256 random bits, so one fast hash is enough: nobody can brute-force the hash
back into a key. `create` prints the key once; the file keeps only its hash. Writes are
atomic (temp file + rename) under a lock file, so a running server never reads half a
file, and `KeyRing` reloads the file whenever it changes: no restart needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from loraserve.adapters import check_name

log = logging.getLogger(__name__)

KEY_PREFIX = "lsk-"


@dataclass(frozen=True)
class KeyEntry:
    id: str
    tenant: str
    admin: bool
    sha256: str
    created_at: float


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str) -> list[KeyEntry]:
    """The entries of a key file; a missing file has none. Raises ValueError if malformed."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return []
    except json.JSONDecodeError as e:
        raise ValueError(f"key file {path} is not valid JSON ({e})") from None
    try:
        return [KeyEntry(id=str(k["id"]), tenant=str(k["tenant"]), admin=bool(k["admin"]),
                         sha256=str(k["sha256"]), created_at=float(k["created_at"])) for k in data.get("keys", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"key file {path} has a malformed entry ({e!r})") from None


def create_key(path: str, tenant: str, admin: bool = False) -> tuple[str, KeyEntry]:
    """A new key for `tenant`: returns (the key in clear, to show once; its stored entry)."""
    check_name(tenant, "tenant name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = KeyEntry(id="key-" + secrets.token_hex(4), tenant=tenant, admin=admin, sha256=hash_key(key),
                     created_at=time.time())
    with _locked(path):
        _write_keys(path, read_keys(path) + [entry])
    return key, entry


def revoke_key(path: str, key_or_id: str) -> list[KeyEntry]:
    """Remove the entry with that id (or that key); returns what was removed."""
    digest = hash_key(key_or_id)
    with _locked(path):
        entries = read_keys(path)
        gone = [e for e in entries if e.id == key_or_id or secrets.compare_digest(e.sha256, digest)]
        if not gone:
            raise ValueError(f"no key with id {key_or_id!r} in {path}; `loraserve keys list --file {path}` shows them")
        _write_keys(path, [e for e in entries if e not in gone])
    return gone


def _write_keys(path: str, entries: list[KeyEntry]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".keys-")
    try:
        with os.fdopen(fd, "wb") as f:   # mkstemp makes it 0600: hashes are not for everyone either
            f.write(json.dumps({"format": 1, "keys": [asdict(e) for e in entries]}, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def _locked(path: str):
    """Serialise writers (two `keys create` at once must not lose an entry)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class KeyRing:
    """The server's view of a key file, reloaded when the file changes (checked per lookup)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._by_hash: dict[str, KeyEntry] = {}
        self._refresh()

    def lookup(self, key: str) -> KeyEntry | None:
        self._refresh()
        return self._by_hash.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._by_hash)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                entries = read_keys(self.path)
            except (OSError, ValueError) as e:   # keep the last good keys; say why loudly
                log.error("keeping the previous API keys: %s", e)
                return
            self._by_hash = {e.sha256: e for e in entries}
            self._stamp = stamp
            log.info("API keys loaded from %s: %d keys", self.path, len(entries))
