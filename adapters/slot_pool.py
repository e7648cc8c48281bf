"""The device tier: which adapter sits in which slot at which rank, and the device
buffers that hold them, packed as the LoRA kernels read them (kernels/sgmv.py).

Two halves, kept apart so that scheduling never moves weights:
- bookkeeping (`try_pin`, `unpin`, eviction), which the scheduler calls while it decides
  a step. A pin that needs a slot reserves one and queues the write; a pin whose weights
  are not in CPU memory yet asks for them. Both only record what to do;
- `write_pending()`, which the engine calls once per step after scheduling: the copies
  to the device happen there and only there.

A running request pins its adapter's slot; an adapter that no request pins stays
resident (a later request for it is free) until a slot is needed, then the least
recently used unpinned one is evicted. Slot -1 means "no adapter" and is never stored.

DoRA adapters also get a per-slot output scale per projection group (`LoRAGroup.dora`),
computed at write time against the served base weights, which the model binds with
`bind_base`; adapters on embed_tokens / lm_head get a `VocabSlot`. `extras_slots` names
the slots holding either, so a step without them pays nothing.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from loraserve.kernels.lora_extras import dora_scale
from loraserve.kernels.sgmv import capacity_rank, row_width

from .base_spec import BaseModelSpec
from .pin import Pin
from .slot_vocab import VocabSlot

# The fused projection groups the slot buffers are laid out in, each group's PEFT
# modules in the order of the fused output's columns.
GROUP_MODULES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                 "down": ("down_proj",)}


@dataclass
class LoRAGroup:
    """Slot buffers of one fused projection (e.g. q,k,v of one layer).

    int8 slots (`--lora-dtype int8`) store A and B as int8 codes and one fp32 scale per
    (rank, projection) column of the shrink, `scale`: A's column scale (max|A col| / 127)
    times B_p's rank-row scale (max|B_p row| / 127, LoRA scaling folded in), so
    delta = ((x @ A_q) * scale) @ B_q: the kernels convert the codes as they read them
    and scale the small shrink output, never a weight. Half the bytes of bf16 slots;
    DoRA scales and the vocab parts stay in the activation dtype."""
    A: torch.Tensor                    # [max_loras, in, r_cap, n_proj], slots packed: see kernels/sgmv.py
    Bs: list[torch.Tensor]             # per projection [max_loras, r_cap, out_p], scale folded in
    out_slices: list[tuple[int, int]]  # (column offset, width) of each projection in the fused output
    dora: torch.Tensor | None = None   # [max_loras + 1, out_total] DoRA output scale per slot; ones for
                                       # non-DoRA slots and for row -1 (no adapter)
    scale: torch.Tensor | None = None  # int8 slots: [max_loras, r_cap * n_proj] fp32, packed column order

    @classmethod
    def empty(cls, in_features: int, outs: list[int], max_loras: int, r_max: int, dtype, device,
              int8: bool = False):
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        r_max = capacity_rank(r_max)
        weights = torch.int8 if int8 else dtype
        return cls(
            A=torch.zeros(max_loras, in_features, r_max, len(outs), dtype=weights, device=device),
            Bs=[torch.zeros(max_loras, r_max, o, dtype=weights, device=device) for o in outs],
            out_slices=list(zip(offsets, outs)),
            dora=torch.ones(max_loras + 1, sum(outs), dtype=dtype, device=device),
            scale=torch.zeros(max_loras, r_max * len(outs), device=device) if int8 else None,
        )

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the slots' own, unless they are int8)."""
        return self.dora.dtype

    def load(self, slot: int, rank: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None],
             scaling: float, scale: torch.Tensor | None = None) -> None:
        """Write one adapter into `slot`: pairs[p] = (lora_a [rank, in], lora_b [out_p, rank])
        as PEFT stores them, or None where the adapter does not target projection p (its
        columns stay zero). A is packed on the host and copied in one piece, each B in one."""
        in_features, n_proj = self.A.shape[1], self.A.shape[3]
        width = row_width(rank, n_proj)
        packed = torch.zeros(in_features, width)
        ranks = packed[:, : rank * n_proj].view(in_features, rank, n_proj)
        for p, pair in enumerate(pairs):
            if pair is not None:
                ranks[:, :, p] = pair[0].t().float()
        b_rows = [torch.zeros(rank, B.shape[2]) if pair is None else pair[1].t().float() * scaling
                  for B, pair in zip(self.Bs, pairs)]
        if self.scale is not None:
            packed, b_rows = self._quantize(slot, rank, packed, b_rows)
        self.A[slot].view(-1)[: in_features * width].copy_(packed.to(self.A.dtype).view(-1))
        for B, rows in zip(self.Bs, b_rows):
            B[slot, :rank].copy_(rows.to(B.dtype))
        if self.dora is not None:
            self.dora[slot].copy_(torch.ones(self.dora.shape[1]) if scale is None else scale.to(self.dora.dtype))

    def _quantize(self, slot: int, rank: int, packed: torch.Tensor, b_rows: list[torch.Tensor]):
        """int8 codes of A's packed columns and of each B_p's rows; the combined scale of
        column (r, p) into self.scale[slot] (zero where the adapter has nothing)."""
        n_proj = len(b_rows)
        a_scale = _absmax_scale(packed, dim=0)                            # [width]
        b_scales = [_absmax_scale(rows, dim=1) for rows in b_rows]          # each [rank]
        combined = torch.zeros(self.scale.shape[1])
        cols = rank * n_proj
        combined[:cols] = a_scale[:cols] * torch.stack(b_scales, dim=1).reshape(-1)   # j = r * n_proj + p
        self.scale[slot].copy_(combined)
        return _codes(packed, a_scale[None]), [_codes(rows, bs[:, None]) for rows, bs in zip(b_rows, b_scales)]


def _absmax_scale(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.abs().amax(dim=dim) / 127


def _codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale.clamp(min=1e-30)).round().clamp(-127, 127)


def int8_served(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (lora_a, lora_b) that int8 slots serve: each rank row of A and each rank row of
    s*B rounded as LoRAGroup._quantize rounds them, back in PEFT's shapes. DoRA's norm is
    taken over these, so its rescale matches the delta the kernels compute."""
    a = lora_a.float()
    a_scale = _absmax_scale(a, dim=1)[:, None]
    b = lora_b.t().float() * scaling                                    # [rank, out]
    b_scale = _absmax_scale(b, dim=1)[:, None]
    return _codes(a, a_scale) * a_scale, (_codes(b, b_scale) * b_scale / scaling).t()


def group_shapes(spec: BaseModelSpec) -> dict[str, tuple[int, list[int]]]:
    """group -> (in_features, [out_features of each projection]) of one decoder layer."""
    return {group: (spec.module_shape(modules[0])[0], [spec.module_shape(m)[1] for m in modules])
            for group, modules in GROUP_MODULES.items()}


class SlotPool:
    def __init__(self, max_loras: int, fetch: Callable[[str], object | None],
                 layers: list[dict[str, LoRAGroup]] | None = None):
        """fetch(key) returns an adapter's weights when they are in CPU memory, else None;
        it must not start a load (the pool records the key in `wanted` instead). `layers`
        are the device buffers, one dict of groups per decoder layer; without them the
        pool only keeps books (the tests of eviction need no tensors)."""
        self.max_loras = max_loras
        self.fetch = fetch
        self.layers = layers or []
        self.base_weight: Callable[[int, str], torch.Tensor] | None = None  # (layer, module) -> served [out, in]
        self.vocab: dict[int, VocabSlot] = {}     # slot -> its embed_tokens / lm_head parts, on the device
        self.extras_slots: set[int] = set()      # slots whose adapter is DoRA or has vocab parts
        self.dora_slots: set[int] = set()
        self.slot_of: dict[str, int] = {}
        self.ranks = [0] * max_loras           # ranks[s]: rank of the adapter in slot s (0 = empty)
        self.pins: Counter[str] = Counter()
        self.unpinned: OrderedDict[str, None] = OrderedDict()   # resident, evictable, LRU first
        self.free = list(range(max_loras - 1, -1, -1))
        self.pending: dict[int, object] = {}    # slot -> weights reserved this step, not yet on the device
        self.wanted: set[str] = set()           # asked for while not in CPU memory: to load
        self.num_loads = 0
        self.num_evictions = 0
        self.num_hits = 0

    @classmethod
    def allocate(cls, spec: BaseModelSpec, max_loras: int, fetch, dtype: torch.dtype,
                 device: torch.device | str, int8: bool = False) -> "SlotPool":
        """A pool with zeroed device buffers for every layer of `spec`, sized to its
        max_lora_rank; int8 codes with scales when `int8` (LoRAGroup)."""
        shapes = group_shapes(spec)
        layers = [{g: LoRAGroup.empty(i, outs, max_loras, spec.max_lora_rank, dtype, device, int8)
                   for g, (i, outs) in shapes.items()} for _ in range(spec.num_hidden_layers)]
        return cls(max_loras, fetch, layers)

    def bind_base(self, base_weight: Callable[[int, str], torch.Tensor]) -> None:
        """The model's served base weights, for DoRA's norms: base_weight(layer, "q_proj")
        -> [out, in]; layer -1 with "lm_head" is the output embedding."""
        self.base_weight = base_weight

    # -- bookkeeping (the scheduler's side) ----------------------------------------------
    def try_pin(self, key: str) -> Pin:
        if key in self.slot_of:
            self.num_hits += 1
        else:
            adapter = self.fetch(key)
            if adapter is None:
                self.wanted.add(key)
                return Pin.LOADING
            if not self.free and not self.unpinned:
                return Pin.NO_SLOT
            self._reserve(key, adapter)
        self.pins[key] += 1
        self.unpinned.pop(key, None)
        return Pin.PINNED

    def is_pinned(self, key: str) -> bool:
        return key in self.pins

    def unpin(self, key: str) -> None:
        self.pins[key] -= 1
        if self.pins[key] == 0:
            del self.pins[key]
            self.unpinned[key] = None

    def slot(self, key: str | None) -> int:
        return -1 if key is None else self.slot_of[key]

    def drop(self, key: str) -> None:
        """Forget a resident adapter that no request pins (deleted, or replaced by an
        in-place load); a pinned one stays until its requests end."""
        if key in self.slot_of and key not in self.pins:
            self.unpinned.pop(key, None)
            slot = self.slot_of.pop(key)
            self.pending.pop(slot, None)
            self.vocab.pop(slot, None)           # vocabulary-sized: free it now, not at the next write
            self.extras_slots.discard(slot)
            self.dora_slots.discard(slot)
            self.free.append(slot)

    @property
    def num_used(self) -> int:
        return len(self.slot_of)

    @property
    def device_bytes(self) -> int:
        """Bytes of the slot buffers (every tensor of every layer's groups; vocab parts aside)."""
        total = 0
        for groups in self.layers:
            for group in groups.values():
                for value in vars(group).values():
                    for t in value if isinstance(value, list) else [value]:
                        if isinstance(t, torch.Tensor):
                            total += t.numel() * t.element_size()
        return total

    def _reserve(self, key: str, adapter) -> None:
        if not self.free:
            victim, _ = self.unpinned.popitem(last=False)
            self.free.append(self.slot_of.pop(victim))
            self.num_evictions += 1
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.ranks[slot] = adapter.rank
        self.pending[slot] = adapter
        self.num_loads += 1

    # -- weights (the engine's side, once per step) --------------------------------------
    def write_pending(self) -> list[int]:
        """Copy every adapter reserved since the last call into its slot; returns the slots written."""
        written = sorted(self.pending)
        with torch.no_grad():
            for slot in written:
                self.write(slot, self.pending[slot])
        self.pending.clear()
        return written

    def take_wanted(self) -> set[str]:
        wanted, self.wanted = self.wanted, set()
        return wanted

    def write(self, slot: int, adapter) -> None:
        """Copy an adapter (adapters.LoRAAdapter) into `slot` of every layer's groups."""
        use_dora = getattr(adapter, "use_dora", False)
        for layer, groups in enumerate(self.layers):
            for name, group in groups.items():
                pairs = [(adapter.lora_a[layer, m], adapter.lora_b[layer, m]) if (layer, m) in adapter.lora_a
                         else None for m in GROUP_MODULES[name]]
                scale = self._dora_scale(adapter, layer, name) if use_dora else None
                group.load(slot, adapter.rank, pairs, adapter.scaling, scale)
        self.ranks[slot] = adapter.rank
        self.vocab.pop(slot, None)
        self.extras_slots.discard(slot)
        self.dora_slots.discard(slot)
        if getattr(adapter, "has_extras", False):
            self.extras_slots.add(slot)
            if use_dora:
                self.dora_slots.add(slot)
            if not adapter.vocab.is_empty and self.layers:
                ref = self.layers[0]["o"]
                self.vocab[slot] = VocabSlot.of(adapter, self.base_weight, ref.dtype, ref.A.device)

    def _dora_scale(self, adapter, layer: int, group: str) -> torch.Tensor:
        """The group's fused output scale: m / ||W + sBA|| per projection with DoRA, ones elsewhere."""
        if self.base_weight is None:
            raise RuntimeError("DoRA needs the base weights: the model must bind them (SlotPool.bind_base)")
        parts = []
        for m, (_, width) in zip(GROUP_MODULES[group], self.layers[layer][group].out_slices):
            if (layer, m) in adapter.magnitude:
                a, b = adapter.lora_a[layer, m], adapter.lora_b[layer, m]
                if self.layers and self.layers[layer][group].scale is not None:
                    a, b = int8_served(a, b, adapter.scaling)            # the norm of what is served
                parts.append(dora_scale(self.base_weight(layer, m), a, b, adapter.scaling, adapter.magnitude[layer, m]))
            else:       # no W needed: on a quantized base reading it back is a matmul
                parts.append(torch.ones(width))
        return torch.cat(parts)
