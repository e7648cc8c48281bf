"""One stored adapter version, and its small metadata file on disk."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter version: what the store knows without reading the weights."""

    tenant: str  # the owner's namespace
    name: str
    version: int  # 1, 2, ... per (tenant, name); never reused, even after a delete
    sha256: str  # of adapter_model.safetensors; re-checked on every load
    path: str  # directory holding the PEFT files (adapter_config.json, adapter_model.safetensors)
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    shared: bool  # visible (read-only) to every tenant
    created_at: float  # time.time() at registration
    num_bytes: int  # fp32 bytes of the loaded tensors: what a CPU cache spends on it (copies included)
    kinds: tuple[str, ...] = ("LoRA",)  # "LoRA" / "rsLoRA" / "DoRA", then any embed_tokens / lm_head parts
    copy_bytes: int = 0  # of num_bytes, the modules_to_save copies: counted against max_module_copy_bytes

    @property
    def key(self) -> str:
        """Unique identity, used by caches and prefix-cache hashing: `tenant/name@version`."""
        return f"{self.tenant}/{self.name}@{self.version}"


def record_to_json(record: AdapterRecord, blob_id: str, base_key: str) -> bytes:
    """Metadata file contents; the blob is stored by id so the root directory can move."""
    fields = asdict(record)
    del fields["path"]
    fields["target_modules"] = list(record.target_modules)
    fields["kinds"] = list(record.kinds)
    return json.dumps({"format": 1, "blob": blob_id, "base": base_key, **fields}, indent=1).encode()


def record_from_json(data: bytes, blobs_dir: str) -> tuple[AdapterRecord, str, str]:
    """Parse a metadata file -> (record, blob id, base shape key); raises ValueError/KeyError/TypeError if malformed."""
    meta = json.loads(data)
    blob_id = meta["blob"]
    if not isinstance(blob_id, str) or "/" in blob_id or blob_id.startswith("."):
        raise ValueError(f"bad blob id {blob_id!r}")
    record = AdapterRecord(
        tenant=str(meta["tenant"]), name=str(meta["name"]), version=int(meta["version"]),
        sha256=str(meta["sha256"]), path=os.path.join(blobs_dir, blob_id), rank=int(meta["rank"]),
        alpha=float(meta["alpha"]), use_rslora=bool(meta["use_rslora"]),
        target_modules=tuple(meta["target_modules"]), shared=bool(meta["shared"]),
        created_at=float(meta["created_at"]), num_bytes=int(meta["num_bytes"]),
        kinds=tuple(meta.get("kinds", ("LoRA",))), copy_bytes=int(meta.get("copy_bytes", 0)),
    )
    return record, blob_id, str(meta["base"])
