"""Device slots for LoRA weights, one stacked buffer pair per fused projection group.

A slot holds one adapter for every layer: A packed at the adapter's rank (the kernels'
layout, kernels/sgmv.py), B with its scaling (alpha/r, or alpha/sqrt(r) for rsLoRA)
folded in, so the forward pass does no per-adapter arithmetic. Modules the adapter does
not target stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.kernels.sgmv import capacity_rank, row_width

# PEFT module name -> (fused group, index of the projection inside the group)
MODULE_TO_GROUP = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
GROUP_MODULES = {"qkv": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"], "gate_up": ["gate_proj", "up_proj"],
                 "down": ["down_proj"]}   # each group's projections in MODULE_TO_GROUP's order


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

    def load(self, slot: int, rank: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None],
             scaling: float) -> None:
        """Write one adapter into `slot`: pairs[p] = (lora_a [rank, in], lora_b [out_p, rank])
        as PEFT stores them, or None where the adapter does not target projection p (its
        columns stay zero). A is packed on the host and copied in one piece, each B in one."""
        in_features, n_proj = self.A.shape[1], self.A.shape[3]
        width = row_width(rank, n_proj)
        packed = torch.zeros(in_features, width, dtype=self.A.dtype)
        ranks = packed[:, : rank * n_proj].view(in_features, rank, n_proj)
        for p, pair in enumerate(pairs):
            if pair is not None:
                ranks[:, :, p] = pair[0].t()
        self.A[slot].view(-1)[: in_features * width].copy_(packed.view(-1))
        for B, pair in zip(self.Bs, pairs):
            rows = torch.zeros(rank, B.shape[2]) if pair is None else pair[1].t().float() * scaling
            B[slot, :rank].copy_(rows.to(B.dtype))


def load_slot(groups: list[dict[str, LoRAGroup]], slot: int, adapter) -> None:
    """Copy an adapter (adapters.LoRAAdapter) into a slot of every layer's groups."""
    for layer, layer_groups in enumerate(groups):
        for name, group in layer_groups.items():
            pairs = [(adapter.lora_a[layer, m], adapter.lora_b[layer, m]) if (layer, m) in adapter.lora_a else None
                     for m in GROUP_MODULES[name]]
            group.load(slot, adapter.rank, pairs, adapter.scaling)
