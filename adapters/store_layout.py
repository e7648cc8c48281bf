"""Where the store keeps things on disk, and the moves that keep it consistent.

    <root>/blobs/<weights sha256>-<config sha256[:16]>/   the PEFT files, content-addressed:
        adapter_config.json                           identical uploads share one blob
        adapter_model.safetensors
    <root>/tenants/<tenant>/<name>/<version>.json     one small metadata file per version;
    <root>/tenants/<tenant>/<name>/high_water         highest version ever assigned (after deletes)
    <root>/tmp/                                       staging; swept on start-up
    <root>/quarantine/                                corrupted blobs and metadata, kept for inspection

A blob becomes visible by one directory rename and a version by one file rename, each
after an fsync, so a crash leaves the old state or the new. The blob id names both
files because the same weights with another lora_alpha are another adapter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid

from .durable import fsync_dir

logger = logging.getLogger(__name__)

BLOB_ID = re.compile(r"^[0-9a-f]{64}-[0-9a-f]{16}$")
META_FILE = re.compile(r"^([1-9][0-9]*)\.json$")
HIGH_WATER = "high_water"


def default_store_root() -> str:
    """`$XDG_CACHE_HOME/loraserve/adapters`, else `~/.cache/loraserve/adapters`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "loraserve", "adapters")


def blob_id_for(weights_sha256: str, config_json: bytes) -> str:
    return f"{weights_sha256}-{hashlib.sha256(config_json).hexdigest()[:16]}"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StoreLayout:
    """Paths under one store root, plus the moves (stage, quarantine, sweep) between them."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.blobs = os.path.join(self.root, "blobs")
        self.tenants = os.path.join(self.root, "tenants")
        self.tmp = os.path.join(self.root, "tmp")
        self.quarantine_dir = os.path.join(self.root, "quarantine")

    def ensure(self) -> None:
        for path in (self.blobs, self.tenants, self.tmp, self.quarantine_dir):
            os.makedirs(path, exist_ok=True)

    def blob_dir(self, blob_id: str) -> str:
        return os.path.join(self.blobs, blob_id)

    def name_dir(self, tenant: str, name: str) -> str:
        return os.path.join(self.tenants, tenant, name)

    def meta_path(self, tenant: str, name: str, version: int) -> str:
        return os.path.join(self.name_dir(tenant, name), f"{version}.json")

    def high_water_path(self, tenant: str, name: str) -> str:
        return os.path.join(self.name_dir(tenant, name), HIGH_WATER)

    def new_tmp_path(self, suffix: str = "") -> str:
        return os.path.join(self.tmp, f"{uuid.uuid4().hex}{suffix}")

    def make_name_dir(self, tenant: str, name: str) -> str:
        """Create (durably) the directory that holds a name's version files."""
        path = self.name_dir(tenant, name)
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            fsync_dir(os.path.dirname(path))
            fsync_dir(self.tenants)
        return path

    def sweep_tmp(self) -> None:
        """Remove what interrupted writes left in tmp/; nothing there was ever visible."""
        for entry in os.listdir(self.tmp):
            remove_path(os.path.join(self.tmp, entry))

    def quarantine(self, path: str, reason: str) -> str:
        """Move a corrupted file or blob out of the way, keeping it for inspection."""
        dst = os.path.join(self.quarantine_dir, f"{int(time.time())}-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
        os.replace(path, dst)
        fsync_dir(os.path.dirname(path))
        logger.error("adapter store: quarantined %s -> %s: %s", path, dst, reason)
        return dst


def remove_path(path: str) -> None:
    """Delete a file or a directory tree; a missing path is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
