"""The store's in-memory view: which versions exist, who may see them, which blobs they use.

Plain dicts, no I/O: the store rebuilds it from disk on start-up and updates it after
each durable write, holding its lock around every call.
"""

from __future__ import annotations

from .errors import AdapterConflict
from .record import AdapterRecord

NameKey = tuple[str, str]  # (tenant, name)


class StoreIndex:
    def __init__(self) -> None:
        self.versions: dict[NameKey, dict[int, AdapterRecord]] = {}  # only this base's versions
        self.blob_of: dict[str, str] = {}  # record.key -> blob id
        self.high_water: dict[NameKey, int] = {}  # highest version ever assigned, any base, deleted too
        self.foreign_blobs: set[str] = set()  # used by versions for another base: never collected

    def add(self, record: AdapterRecord, blob_id: str) -> None:
        self.versions.setdefault((record.tenant, record.name), {})[record.version] = record
        self.blob_of[record.key] = blob_id
        self.note_version(record.tenant, record.name, record.version)

    def remove(self, record: AdapterRecord) -> None:
        versions = self.versions.get((record.tenant, record.name), {})
        versions.pop(record.version, None)
        if not versions:
            self.versions.pop((record.tenant, record.name), None)
        self.blob_of.pop(record.key, None)

    def note_version(self, tenant: str, name: str, version: int) -> None:
        key = (tenant, name)
        self.high_water[key] = max(self.high_water.get(key, 0), version)

    def next_version(self, tenant: str, name: str) -> int:
        return self.high_water.get((tenant, name), 0) + 1

    def records_of_blob(self, blob_id: str) -> list[AdapterRecord]:
        return [r for versions in self.versions.values() for r in versions.values()
                if self.blob_of[r.key] == blob_id]

    def blob_in_use(self, blob_id: str) -> bool:
        return blob_id in self.foreign_blobs or bool(self.records_of_blob(blob_id))

    def own(self, tenant: str, name: str) -> dict[int, AdapterRecord]:
        return dict(self.versions.get((tenant, name), {}))

    def visible(self, tenant: str, owner: str | None, name: str) -> dict[int, AdapterRecord]:
        """The versions of `name` that `tenant` may use: its own first, else one other owner's shared ones."""
        if owner is not None:
            versions = self.own(owner, name)
            return versions if owner == tenant else {v: r for v, r in versions.items() if r.shared}
        own = self.own(tenant, name)
        if own:
            return own
        sharers = {t: self._shared(t, name) for (t, n) in self.versions if n == name and t != tenant}
        sharers = {t: versions for t, versions in sharers.items() if versions}
        if len(sharers) > 1:
            owners = sorted(sharers)
            raise AdapterConflict(f"adapter {name!r} is shared by several tenants ({', '.join(owners)}); "
                                  f"name one of them, as in '{owners[0]}/{name}'")
        return next(iter(sharers.values()), {})

    def listing(self, tenant: str) -> list[AdapterRecord]:
        """Newest visible version of each name, by name; the tenant's own before others' shared ones."""
        newest = [versions[max(versions)] for (t, _), versions in self.versions.items() if t == tenant]
        own_names = {r.name for r in newest}
        for (t, name) in self.versions:
            shared = self._shared(t, name)
            if t != tenant and name not in own_names and shared:
                newest.append(shared[max(shared)])
        return sorted(newest, key=lambda r: (r.name, r.tenant != tenant, r.tenant))

    def _shared(self, tenant: str, name: str) -> dict[int, AdapterRecord]:
        return {v: r for v, r in self.versions.get((tenant, name), {}).items() if r.shared}
