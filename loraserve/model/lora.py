"""Device slots for LoRA weights, one stacked buffer pair per fused projection group.

A slot holds one adapter for every layer: A packed at the adapter's rank (the kernels'
layout, kernels/sgmv.py), B with its scaling (alpha/r, or alpha/sqrt(r) for rsLoRA)
folded in, so the forward pass does no per-adapter arithmetic. Modules the adapter does
not target stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.kernels.sgmv import capacity_rank, slot_a

# PEFT module name -> (fused group, index of the projection inside the group)
MODULE_TO_GROUP = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}


@dataclass
class LoRAGroup:
    """Slot buffers of one fused projection (e.g. q,k,v of one layer)."""
    A: torch.Tensor                    # [max_loras, in, r_cap, n_proj], slots packed: see kernels/sgmv.py
    Bs: list[torch.Tensor]             # per projection [max_loras, r_cap, out_p], scale folded in
    out_slices: list[tuple[int, int]]  # (column offset, width) of each projection in the fused output

    @classmethod
    def empty(cls, in_features: int, outs: list[int], max_loras: int, r_max: int, dtype, device):
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        r_max = capacity_rank(r_max)
        return cls(
            A=torch.zeros(max_loras, in_features, r_max, len(outs), dtype=dtype, device=device),
            Bs=[torch.zeros(max_loras, r_max, o, dtype=dtype, device=device) for o in outs],
            out_slices=list(zip(offsets, outs)),
        )

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        for B in self.Bs:
            B[slot].zero_()

    def write(self, slot: int, p: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """lora_a [r, in], lora_b [out, r] as PEFT stores them (one r for all modules)."""
        r = lora_a.shape[0]
        packed = slot_a(self.A, slot, r).view(self.A.shape[1], r, self.A.shape[3])
        packed[:, :, p] = lora_a.t().to(self.A.dtype)
        self.Bs[p][slot, :r] = (lora_b.t().float() * scaling).to(self.A.dtype)


def load_slot(groups: list[dict[str, LoRAGroup]], slot: int, adapter) -> None:
    """Copy an adapter (adapters.LoRAAdapter) into a slot of every layer's groups."""
    for layer_groups in groups:
        for group in layer_groups.values():
            group.clear(slot)
    for (layer, module), lora_a in adapter.lora_a.items():
        group_name, p = MODULE_TO_GROUP[module]
        groups[layer][group_name].write(slot, p, lora_a, adapter.lora_b[(layer, module)], adapter.scaling)
