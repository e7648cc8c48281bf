"""The `model` field -> what the engine runs: the base model, or one adapter version.

Accepted: the base model id (or a --served-model-name), `name`, `name@3`, `owner/name[@3]`
(another tenant's shared adapter), and `base:name[@3]`, the form SGLang and Ray Serve
LLM use. The name is resolved once here to its version's record, which the engine's
`prepare` takes as resolved, so the metrics label, the usage counts and the weights all
refer to the same version even if a new one is registered meanwhile. An admin may name
any tenant's adapter as `owner/name`.
"""

from __future__ import annotations

from dataclasses import dataclass

from anyio import to_thread

from loraserve.adapters import AdapterNotFound, AdapterRecord, AdapterRejected, parse_ref

from .auth import Caller
from .errors import model_not_found


@dataclass(frozen=True)
class Target:
    label: str                          # metrics label: the base model id, or 'owner/name'
    record: AdapterRecord | None = None  # the adapter version; None = the base model


def split_base_prefix(model: str, base_names: set[str]) -> str | None:
    """`base:name` -> `name`; None when `model` has no known base prefix."""
    left, sep, right = model.rpartition(":")
    return right if sep and left in base_names else None


async def resolve_target(store, caller: Caller, model: str, base_id: str, base_names: set[str]) -> Target:
    if model in base_names:
        return Target(base_id)
    ref = split_base_prefix(model, base_names)
    if ref is None and ":" in model:
        raise model_not_found(model)
    ref = ref if ref is not None else model
    try:
        record = await to_thread.run_sync(resolve_record, store, caller, ref)
    except (AdapterNotFound, AdapterRejected):
        raise model_not_found(model) from None
    return Target(f"{record.tenant}/{record.name}", record)


def resolve_record(store, caller: Caller, ref: str) -> AdapterRecord:
    """The record `ref` names for this caller; an admin reaches any tenant's through `owner/`."""
    parts = parse_ref(ref)
    if caller.admin and parts.owner is not None and parts.owner != caller.tenant:
        local = parts.name if parts.version is None else f"{parts.name}@{parts.version}"
        return store.resolve(parts.owner, local)
    return store.resolve(caller.tenant, ref)


def public_id(caller: Caller, record: AdapterRecord) -> str:
    """How /v1/models and /v1/adapters name an adapter to this caller."""
    return record.name if record.tenant == caller.tenant else f"{record.tenant}/{record.name}"

