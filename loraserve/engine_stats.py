"""One snapshot of the engine's state: what /metrics, the console and a Ray replica's
report read, typed so a renamed counter is an error where it is read, not a silent 0.

Every field is a count since start or a current level; a Ray ingress sums the replicas'
snapshots (`EngineStats.total`), and one with no replica yet reports all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0                # requests in the running batch
    num_waiting: int = 0                # requests waiting to be scheduled
    num_preemptions: int = 0            # running requests sent back to wait, their KV dropped
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0       # prompt blocks looked up in the prefix cache
    prefix_cache_hits: int = 0
    adapter_slots_total: int = 0
    adapter_slots_used: int = 0
    adapter_slots_pinned: int = 0       # slots held by running requests
    adapter_loads: int = 0              # adapters copied into a device slot
    adapter_evictions: int = 0          # adapters evicted from a device slot
    device_hits: int = 0                # adapter lookups served by a device slot
    cpu_hits: int = 0                   # ... by the CPU cache
    disk_loads: int = 0                 # ... read from the store on disk
    disk_load_seconds: float = 0.0      # total time of those reads
    base_weight_bytes: int = 0          # the base's projection weights as served (set by --quantization)
    adapter_slot_bytes: int = 0         # the device slot pool's buffers
    resident: dict[str, list[str]] = field(default_factory=dict)   # tier -> adapter keys held there

    @classmethod
    def total(cls, snapshots: list["EngineStats"]) -> "EngineStats":
        """The sum over replicas; `resident` is the union of their tiers."""
        counts = {f.name: sum(getattr(s, f.name) for s in snapshots) for f in fields(cls) if f.name != "resident"}
        resident: dict[str, set[str]] = {"device": set(), "cpu": set()}
        for s in snapshots:
            for tier, keys in s.resident.items():
                resident.setdefault(tier, set()).update(keys)
        return cls(**counts, resident={tier: sorted(keys) for tier, keys in resident.items()})

    def tier_of(self, key: str) -> str:
        """The best tier holding adapter version `key`: device, cpu or disk."""
        if key in self.resident.get("device", ()):
            return "device"
        return "cpu" if key in self.resident.get("cpu", ()) else "disk"
