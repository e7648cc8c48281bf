"""Start-up: rebuild the store's index from disk, verify every blob, set aside what is broken.

Whatever a crash or a bad disk left behind, start-up succeeds: stray temp files and
unreferenced blobs are removed, unreadable metadata and blobs whose hashes do not match
are quarantined (and logged), and every intact adapter keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import os

from .names import check_name
from .errors import AdapterRejected
from .peft_format import CONFIG_NAME, WEIGHTS_NAME
from .record import record_from_json
from .store_index import StoreIndex
from .store_layout import BLOB_ID, HIGH_WATER, META_FILE, StoreLayout, remove_path, sha256_file

logger = logging.getLogger(__name__)


def rebuild_index(layout: StoreLayout, base_key: str) -> StoreIndex:
    """Scan `layout` and return the index of intact versions for the base with `base_key`."""
    layout.ensure()
    layout.sweep_tmp()
    index = StoreIndex()
    for tenant, name in _name_dirs(layout):
        _read_name_dir(layout, index, tenant, name, base_key)
    _verify_blobs(layout, index)
    _collect_orphan_blobs(layout, index)
    return index


def blob_problem(blob_id: str, config_sha256: str, weights_sha256: str) -> str | None:
    """Why the blob's contents do not match its id, or None when they do."""
    if weights_sha256 != blob_id[:64]:
        return f"{WEIGHTS_NAME} sha256 is {weights_sha256}, expected {blob_id[:64]}"
    if config_sha256[:16] != blob_id[65:]:
        return f"{CONFIG_NAME} sha256 starts {config_sha256[:16]}, expected {blob_id[65:]}"
    return None


def bytes_problem(blob_id: str, config_json: bytes, safetensors_bytes: bytes) -> str | None:
    return blob_problem(blob_id, hashlib.sha256(config_json).hexdigest(), hashlib.sha256(safetensors_bytes).hexdigest())


def _name_dirs(layout: StoreLayout):
    for tenant in sorted(os.listdir(layout.tenants)):
        for name in sorted(_listdir(os.path.join(layout.tenants, tenant))):
            if _valid(tenant, "tenant name") and _valid(name) and os.path.isdir(layout.name_dir(tenant, name)):
                yield tenant, name
            else:
                logger.warning("adapter store: ignoring unexpected entry %s", layout.name_dir(tenant, name))


def _read_name_dir(layout: StoreLayout, index: StoreIndex, tenant: str, name: str, base_key: str) -> None:
    index.note_version(tenant, name, _read_high_water(layout.high_water_path(tenant, name)))
    for entry in sorted(os.listdir(layout.name_dir(tenant, name))):
        match = META_FILE.match(entry)
        if match is None:
            if entry != HIGH_WATER:
                logger.warning("adapter store: ignoring unexpected file %s", os.path.join(tenant, name, entry))
            continue
        path = layout.meta_path(tenant, name, int(match[1]))
        index.note_version(tenant, name, int(match[1]))  # even if unreadable: never reuse its number
        try:
            with open(path, "rb") as f:
                record, blob_id, record_base = record_from_json(f.read(), layout.blobs)
            if (record.tenant, record.name, record.version) != (tenant, name, int(match[1])):
                raise ValueError(f"it describes {record.key}")
            if not BLOB_ID.match(blob_id) or blob_id[:64] != record.sha256:
                raise ValueError(f"blob id {blob_id!r} does not match sha256 {record.sha256}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            layout.quarantine(path, f"unreadable adapter metadata ({e})")
            continue
        if record_base == base_key:
            index.add(record, blob_id)
        else:  # registered while another base model was served: kept, not shown
            index.foreign_blobs.add(blob_id)


def _verify_blobs(layout: StoreLayout, index: StoreIndex) -> None:
    for blob_id in sorted(set(index.blob_of.values())):
        blob_dir = layout.blob_dir(blob_id)
        try:
            problem = blob_problem(blob_id, sha256_file(os.path.join(blob_dir, CONFIG_NAME)),
                                   sha256_file(os.path.join(blob_dir, WEIGHTS_NAME)))
        except OSError as e:
            problem = f"cannot read it ({e})"
        if problem is not None:
            quarantine_blob(layout, index, blob_id, problem)


def quarantine_blob(layout: StoreLayout, index: StoreIndex, blob_id: str, problem: str) -> None:
    """Set aside a corrupted blob and every version that uses it; the rest keeps serving."""
    records = index.records_of_blob(blob_id)
    keys = ", ".join(r.key for r in records)
    if os.path.exists(layout.blob_dir(blob_id)):
        layout.quarantine(layout.blob_dir(blob_id), f"corrupted adapter blob used by {keys}: {problem}")
    for record in records:
        meta = layout.meta_path(record.tenant, record.name, record.version)
        if os.path.exists(meta):
            layout.quarantine(meta, f"its blob {blob_id} is corrupted; register {record.tenant}/{record.name} again")
        index.remove(record)


def _collect_orphan_blobs(layout: StoreLayout, index: StoreIndex) -> None:
    # A crash between the blob rename and the metadata rename leaves a blob nobody names.
    for entry in os.listdir(layout.blobs):
        if not BLOB_ID.match(entry):
            logger.warning("adapter store: ignoring unexpected entry %s", layout.blob_dir(entry))
        elif not index.blob_in_use(entry):
            logger.info("adapter store: removing unreferenced blob %s", entry)
            remove_path(layout.blob_dir(entry))


def _read_high_water(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        logger.warning("adapter store: unreadable %s (%s); version numbers continue from the files present", path, e)
        return 0


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _valid(name: str, what: str = "adapter name") -> bool:
    try:
        check_name(name, what)
        return True
    except AdapterRejected:
        return False
