"""The durable, per-tenant, versioned adapter store (see store_layout for the files on disk).

Registering `support-bot` again makes version 2 and moves the alias: a request names
`support-bot` (newest) or `support-bot@1`. Each tenant has its own namespace; a version
registered with shared=True is visible, read-only, to every tenant. Validation runs
before anything is written, so a rejected adapter stores nothing.

One process owns a root. Registration validates and stages outside the lock (large
uploads do not stall `resolve`), then commits under it: blob rename, metadata rename,
index update. Version numbers are never reused, even after a delete, so a record's
`key` always means the same weights to every cache.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from .base_spec import BaseModelSpec
from .durable import fsync_dir, write_durably, write_file_atomic
from .errors import AdapterError, AdapterNotFound
from .names import check_name, parse_ref
from .peft_format import LoRAAdapter, load_peft_bytes, read_peft_dir, write_peft_files
from .record import AdapterRecord, record_to_json
from .sources import fetch_source
from .store_index import StoreIndex
from .store_layout import StoreLayout, blob_id_for, default_store_root, remove_path
from .store_recovery import bytes_problem, quarantine_blob, rebuild_index

# Steps of a registration, in order; a test's fault hook may raise at any of them.
WRITE_STEPS = ("validated", "staged", "blob_committed", "meta_staged", "meta_committed", "indexed")


def _no_fault(step: str) -> None:
    pass


class AdapterStore:
    """Adapters on disk under `root`, per tenant and version; thread-safe."""

    def __init__(self, root: str | os.PathLike | None, spec: BaseModelSpec, max_adapter_bytes: int = 512 << 20,
                 fault: Callable[[str], None] = _no_fault):
        """`fault(step)` runs between the steps of a write (a seam: tests raise in it to
        simulate a crash there)."""
        self.spec = spec
        self.max_adapter_bytes = max_adapter_bytes
        self.layout = StoreLayout(root if root is not None else default_store_root())
        self._lock = threading.Lock()
        self._fault = fault
        self._index: StoreIndex = rebuild_index(self.layout, spec.shape_key)
        self._verified: dict[str, tuple] = {}   # blob dir -> file signature when last hashed

    @property
    def root(self) -> str:
        return self.layout.root

    # -- registration -------------------------------------------------------------------

    def register_dir(self, tenant: str, name: str, path: str | os.PathLike, shared: bool = False) -> AdapterRecord:
        """Register the PEFT adapter saved in a local directory."""
        _check_names(tenant, name)
        config_json, safetensors_bytes = read_peft_dir(path, self.max_adapter_bytes)
        return self.register_bytes(tenant, name, config_json, safetensors_bytes, shared)

    def register_source(self, tenant: str, name: str, source: str, shared: bool = False) -> AdapterRecord:
        """Register from `hf://org/repo[@revision]`, `file://path` or a local path."""
        _check_names(tenant, name)
        return self.register_dir(tenant, name, fetch_source(source), shared)

    def register_bytes(self, tenant: str, name: str, config_json: bytes, safetensors_bytes: bytes,
                       shared: bool = False) -> AdapterRecord:
        """Validate, then store atomically as the next version of `tenant`'s `name`."""
        _check_names(tenant, name)
        adapter = load_peft_bytes(config_json, safetensors_bytes, self.spec, self.max_adapter_bytes)
        self._fault("validated")
        blob_id = blob_id_for(adapter.sha256, config_json)
        staged = self.layout.new_tmp_path()
        try:
            write_peft_files(staged, config_json, safetensors_bytes)
            self._fault("staged")
            with self._lock:
                record = self._commit(tenant, name, blob_id, staged, adapter, shared)
        except Exception:  # an error, not a crash: tidy up now rather than at the next start-up
            remove_path(staged)
            raise
        remove_path(staged)  # still there only when an identical blob already existed
        self._fault("indexed")
        return record

    def _commit(self, tenant: str, name: str, blob_id: str, staged: str, adapter: LoRAAdapter,
                shared: bool) -> AdapterRecord:
        blob_dir = self.layout.blob_dir(blob_id)
        if not os.path.isdir(blob_dir):
            os.rename(staged, blob_dir)
            fsync_dir(self.layout.blobs)
            self._verified[blob_dir] = _signature(blob_dir)     # these bytes were just hashed
        try:
            self._fault("blob_committed")
            record = AdapterRecord(
                tenant=tenant, name=name, version=self._index.next_version(tenant, name), sha256=adapter.sha256,
                path=blob_dir, rank=adapter.rank, alpha=adapter.alpha, use_rslora=adapter.use_rslora,
                target_modules=adapter.target_modules, shared=bool(shared), created_at=time.time(),
                num_bytes=adapter.num_bytes, kinds=adapter.kinds, copy_bytes=adapter.vocab.copy_bytes)
            self._write_meta(record, blob_id)
        except Exception:
            self._drop_blob_if_unused(blob_id)  # a real crash leaves it for start-up to collect
            raise
        # The version exists from the rename on: index it before anything else can fail.
        self._index.add(record, blob_id)
        self._fault("meta_committed")
        fsync_dir(self.layout.name_dir(tenant, name))
        return record

    def _write_meta(self, record: AdapterRecord, blob_id: str) -> None:
        # write_file_atomic's steps, less the final directory fsync, spelled out so a test can fail between them.
        self.layout.make_name_dir(record.tenant, record.name)
        tmp = self.layout.new_tmp_path(".json")
        try:
            write_durably(tmp, record_to_json(record, blob_id, self.spec.shape_key))
            self._fault("meta_staged")
            os.rename(tmp, self.layout.meta_path(record.tenant, record.name, record.version))
        except Exception:
            remove_path(tmp)
            raise

    # -- lookup -------------------------------------------------------------------------

    def resolve(self, tenant: str, ref: str) -> AdapterRecord:
        """`name` (newest) or `name@3`, or `owner/name[@3]` for a shared one; own names come first."""
        check_name(tenant, "tenant name")
        parts = parse_ref(ref)
        with self._lock:
            versions = self._index.visible(tenant, parts.owner, parts.name)
        version = parts.version if parts.version is not None else max(versions, default=None)
        if version not in versions:
            raise _not_found(tenant, ref)
        return versions[version]

    def list(self, tenant: str) -> list[AdapterRecord]:
        """The newest visible version of each name (own and other tenants' shared ones), by name."""
        check_name(tenant, "tenant name")
        with self._lock:
            return self._index.listing(tenant)

    def versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every visible version of `name` (or `owner/name`), oldest first."""
        check_name(tenant, "tenant name")
        parts = parse_ref(name)
        with self._lock:
            versions = self._index.visible(tenant, parts.owner, parts.name)
        if not versions or parts.version is not None:
            raise _not_found(tenant, name)
        return [versions[v] for v in sorted(versions)]

    def owned(self, tenant: str | None = None) -> list[AdapterRecord]:
        """Every version `tenant` owns (every tenant's when None: an operator's view), by
        tenant, name and version."""
        if tenant is not None:
            check_name(tenant, "tenant name")
        with self._lock:
            records = [r for (t, _), versions in self._index.versions.items() if tenant in (None, t)
                       for r in versions.values()]
        return sorted(records, key=lambda r: (r.tenant, r.name, r.version))

    def load(self, record: AdapterRecord) -> LoRAAdapter:
        """Read a version's weights, verifying them against the hash recorded at registration."""
        blob_id = os.path.basename(record.path)
        try:
            config_json, safetensors_bytes = read_peft_dir(record.path)
            signature = _signature(record.path)
        except (AdapterError, OSError):  # a concurrent delete may remove the blob mid-read
            raise AdapterNotFound(f"adapter {record.key} is no longer stored (deleted or quarantined); "
                                  "resolve it again or register it again") from None
        if self._verified.get(record.path) != signature:     # hash once per change of the file
            problem = bytes_problem(blob_id, config_json, safetensors_bytes)
            if problem is not None:
                with self._lock:
                    quarantine_blob(self.layout, self._index, blob_id, problem)
                raise AdapterError(f"adapter {record.key} is corrupted on disk ({problem}) and was quarantined "
                                   f"under {self.layout.quarantine_dir}; register it again")
            self._verified[record.path] = signature
        # validated at registration and unchanged since: skip the NaN/inf scan
        return load_peft_bytes(config_json, safetensors_bytes, self.spec, sha256=record.sha256, check_values=False)

    # -- a root shared with a writer in another process ---------------------------------

    def adopt(self, record: AdapterRecord, blob_id: str) -> None:
        """Index a version that another process registered under a shared root (a Ray
        replica learning what the ingress wrote)."""
        with self._lock:
            self._index.add(record, blob_id)

    def unindex(self, record: AdapterRecord) -> None:
        """Forget a version whose files another process deleted."""
        with self._lock:
            self._index.remove(record)

    # -- deletion -----------------------------------------------------------------------

    def delete(self, tenant: str, ref: str) -> list[AdapterRecord]:
        """Delete `name` (every version) or `name@2` (one); only the owner may. Returns what was removed."""
        check_name(tenant, "tenant name")
        parts = parse_ref(ref)
        if parts.owner not in (None, tenant):
            raise _not_found(tenant, ref)
        with self._lock:
            versions = self._index.own(tenant, parts.name)
            doomed = [versions[v] for v in sorted(versions) if parts.version in (None, v)]
            if not doomed:
                raise _not_found(tenant, ref)
            self._remember_high_water(tenant, parts.name)
            for record in doomed:  # oldest first: a crash midway leaves the newest as the alias
                os.remove(self.layout.meta_path(tenant, record.name, record.version))
                self._index.remove(record)
            fsync_dir(self.layout.name_dir(tenant, parts.name))
            for blob_id in {os.path.basename(r.path) for r in doomed}:
                self._drop_blob_if_unused(blob_id)
        return doomed

    def _remember_high_water(self, tenant: str, name: str) -> None:
        # Written before any version file goes, so a deleted number is never handed out again.
        high = self._index.next_version(tenant, name) - 1
        write_file_atomic(self.layout.high_water_path(tenant, name), str(high).encode(), self.layout.tmp)

    def _drop_blob_if_unused(self, blob_id: str) -> None:
        if not self._index.blob_in_use(blob_id):
            remove_path(self.layout.blob_dir(blob_id))


def _signature(blob_dir: str) -> tuple:
    """What changes when a file is rewritten: size, mtime and inode of both files."""
    return tuple((st.st_size, st.st_mtime_ns, st.st_ino)
                 for st in (os.stat(os.path.join(blob_dir, f)) for f in sorted(os.listdir(blob_dir))))


def _check_names(tenant: str, name: str) -> None:
    check_name(tenant, "tenant name")
    check_name(name)


def _not_found(tenant: str, ref: str) -> AdapterNotFound:
    # The same words whether the name is unknown or belongs to another tenant: no probing.
    return AdapterNotFound(f"adapter {ref!r} not found for tenant {tenant!r}; "
                           "list the adapters you can use with GET /v1/adapters")
