"""The device copy of one slot's embed_tokens / lm_head parts, laid out as the step
reads them (loraserve/model/adapter_extras.py), scaling folded in like the projections'.

Unlike the projection buffers these are allocated per slot when an adapter is written,
not up front: they are vocabulary-sized, and most adapters have none. Their size is
bounded per adapter by the spec's max_module_copy_bytes (checked at load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from loraserve.kernels.lora_extras import dora_scale


@dataclass
class VocabSlot:
    embed_a_t: torch.Tensor | None = None    # [vocab, r]   A^T of the embedding LoRA: a row lookup is the shrink
    embed_b_t: torch.Tensor | None = None    # [r, hidden]  B^T * scaling
    head_a_t: torch.Tensor | None = None     # [hidden, r]
    head_b_t: torch.Tensor | None = None     # [r, vocab]   B^T * scaling
    head_scale: torch.Tensor | None = None   # [vocab]      DoRA on lm_head: m / ||W + sBA||
    embed_copy: torch.Tensor | None = None   # [vocab, hidden]  modules_to_save
    head_copy: torch.Tensor | None = None    # [vocab, hidden]
    token_ids: torch.Tensor | None = None    # [k] int64: trainable tokens
    token_rows: torch.Tensor | None = None   # [k, hidden]: their new embedding rows

    @property
    def touches_embedding(self) -> bool:
        return self.embed_a_t is not None or self.embed_copy is not None or self.token_ids is not None

    @classmethod
    def of(cls, adapter, base_weight: Callable[[int, str], torch.Tensor] | None, dtype, device) -> "VocabSlot":
        """adapter: a LoRAAdapter with non-empty `vocab`; base_weight(-1, "lm_head") is the
        served lm_head weight [vocab, hidden] (for DoRA's norm)."""
        v, s = adapter.vocab, adapter.scaling
        put = lambda t: None if t is None else t.to(dtype=dtype, device=device).contiguous()
        out = cls(embed_copy=put(v.embed_copy), head_copy=put(v.head_copy), token_rows=put(v.token_rows))
        if v.embed_a is not None:
            out.embed_a_t, out.embed_b_t = put(v.embed_a.t()), put(v.embed_b.t() * s)
        if v.head_a is not None:
            out.head_a_t, out.head_b_t = put(v.head_a.t()), put(v.head_b.t() * s)
        if v.head_magnitude is not None:
            if base_weight is None:
                raise RuntimeError("DoRA on lm_head needs the base weights: the model must bind them to the slot pool")
            out.head_scale = put(dora_scale(base_weight(-1, "lm_head"), v.head_a, v.head_b, s, v.head_magnitude))
        if v.token_ids:
            out.token_ids = torch.tensor(v.token_ids, dtype=torch.int64, device=device)
        return out
