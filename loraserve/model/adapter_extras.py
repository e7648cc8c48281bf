"""The model side of the adapter kinds beyond a projection's LoRA delta: DoRA's output
rescale, LoRA / full copies / trainable tokens on embed_tokens, LoRA / DoRA / a full copy
on lm_head. Each applies to its own adapter's rows only.

A step builds a `StepExtras` only when one of its adapters has such parts (the slot
pool's `extras_slots`); otherwise it is None and the model runs exactly as without this
module. Such steps run eagerly: the runner does not replay CUDA graphs for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.adapters import LoRAGroup, SlotPool
from loraserve.adapters.slot_pool import GROUP_MODULES
from loraserve.adapters.slot_vocab import VocabSlot
from loraserve.kernels.lora_extras import apply_row_scale, embedding_lora, replace_token_rows


@dataclass
class StepExtras:
    token_slots: torch.Tensor                 # [T] int64: adapter slot per token, -1 = base (row -1 of dora: ones)
    has_dora: bool                            # some token's adapter is DoRA
    token_rows: dict[int, torch.Tensor]       # slot -> its tokens' indices, for slots with vocab parts
    sample_rows: dict[int, torch.Tensor]      # slot -> its rows among the sampled hidden states
    vocab: dict[int, VocabSlot]               # slot -> its embed_tokens / lm_head parts


def step_extras(pool: SlotPool, token_slots: list[int], sample_idx: list[int],
                device: torch.device) -> StepExtras | None:
    """The step's extras, or None when no adapter of the step has any (the common case)."""
    present = set(token_slots) & pool.extras_slots
    if not present:
        return None
    vocab = {s: pool.vocab[s] for s in present if s in pool.vocab}
    index = lambda rows: torch.tensor(rows, dtype=torch.int64, device=device)
    sample_slots = [token_slots[i] for i in sample_idx]
    return StepExtras(
        token_slots=index(token_slots),
        has_dora=bool(present & pool.dora_slots),
        token_rows={s: index([t for t, x in enumerate(token_slots) if x == s]) for s in vocab},
        sample_rows={s: index([i for i, x in enumerate(sample_slots) if x == s]) for s in vocab},
        vocab=vocab,
    )


def embed_tokens(embed: nn.Embedding, input_ids: torch.Tensor, extras: StepExtras | None) -> torch.Tensor:
    """The embedding lookup, then per adapter: its full copy (modules_to_save) or its
    trainable tokens' rows, plus its embedding LoRA delta."""
    x = embed(input_ids)                                             # [T, hidden]
    if extras is None:
        return x
    for slot, rows in extras.token_rows.items():
        v = extras.vocab[slot]
        if not v.touches_embedding or rows.numel() == 0:
            continue
        ids = input_ids[rows]
        part = v.embed_copy[ids] if v.embed_copy is not None else x[rows]
        if v.token_ids is not None:
            part = replace_token_rows(part.clone(), ids, v.token_ids, v.token_rows)
        if v.embed_a_t is not None:
            part = part + embedding_lora(ids, v.embed_a_t, v.embed_b_t)
        x[rows] = part
    return x


def apply_dora(y: torch.Tensor, linear: nn.Module, group: LoRAGroup, extras: StepExtras | None) -> torch.Tensor:
    """DoRA rows: out = scale * (x W^T + s x A^T B^T) + bias, from y = x W^T + bias + s x A^T B^T."""
    if extras is not None and extras.has_dora:
        apply_row_scale(y, linear.bias, group.dora, extras.token_slots)
    return y


def compute_logits(hidden: torch.Tensor, logits: torch.Tensor, tied: bool, extras: StepExtras | None) -> torch.Tensor:
    """The base's logits [S, vocab] of the sampled rows (hidden [S, hidden]), each row
    changed by its adapter's lm_head: a full copy, LoRA (DoRA-rescaled when it has a
    scale), and with a tied base, its trainable tokens' rows (PEFT ties them to lm_head too)."""
    if extras is None:
        return logits
    for slot, rows in extras.sample_rows.items():
        v = extras.vocab[slot]
        if rows.numel() == 0:
            continue
        h = hidden[rows]
        part = F.linear(h, v.head_copy) if v.head_copy is not None else logits[rows]
        if tied and v.token_ids is not None:
            part[:, v.token_ids] = F.linear(h, v.token_rows)
        if v.head_a_t is not None:
            part = part + (h @ v.head_a_t) @ v.head_b_t
            if v.head_scale is not None:
                part = part * v.head_scale
        logits[rows] = part
    return logits


def base_weight(model, layer: int, module: str) -> torch.Tensor:
    """The served base weight [out, in] of one projection, sliced out of the fused layout
    (q,k,v -> qkv; gate,up -> gate_up); layer -1 with "lm_head" is the output embedding.
    Bound to the slot pool for DoRA's norms."""
    if module == "lm_head":
        return model.output_weight()
    group = next(g for g, modules in GROUP_MODULES.items() if module in modules)
    target = model.layers[layer]
    proj = {"qkv": target.attn.qkv, "o": target.attn.o, "gate_up": target.mlp.gate_up, "down": target.mlp.down}[group]
    offset, width = proj.lora.out_slices[GROUP_MODULES[group].index(module)]
    return proj.dense_weight()[offset : offset + width]
