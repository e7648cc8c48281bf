"""Torch ops for the adapter kinds beyond a projection's LoRA delta: DoRA's output
rescale and LoRA on the vocabulary-sized modules (embed_tokens, lm_head).

Each is a handful of torch ops on the rows of the step that use such an adapter; every
backend (torch, Triton) runs them as they are, after its own add_lora. No Triton kernel:
a DoRA rescale is one elementwise op per projection, and embedding/lm_head LoRA touch
only the tokens (or sampled rows) of their adapter.
"""

from __future__ import annotations

import torch


def dora_scale(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """PEFT's DoraLinearLayer rescale, computed once per adapter at load time:
    scale = m / ||W + s * B @ A||_row   (one L2 norm per output feature, treated as a constant).
    weight [out, in], lora_a [r, in], lora_b [out, r], magnitude [out] -> [out], fp32."""
    merged = weight.float() + scaling * (lora_b.float() @ lora_a.float())   # [out, in]
    return magnitude.float() / torch.linalg.norm(merged, dim=1)


def apply_row_scale(y: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor,
                    token_slots: torch.Tensor) -> torch.Tensor:
    """y[t] = scales[slot[t]] * (y[t] - bias) + bias, in place: DoRA's
    out = scale * (x W^T + s x A^T B^T) + bias, given y = x W^T + bias + s x A^T B^T.
    scales [max_loras + 1, out]: row -1 (tokens without an adapter) and every non-DoRA
    slot's row are ones, so those rows come out unchanged."""
    scale = scales[token_slots]                                  # [T, out]
    if bias is None:
        return y.mul_(scale)
    return y.sub_(bias).mul_(scale).add_(bias)


def apply_row_scale_ref(y, bias, scales, token_slots):
    """A plain loop over tokens: the oracle of apply_row_scale."""
    out = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        b = 0 if bias is None else bias
        out[t] = scales[s] * (y[t] - b) + b
    return out


def embedding_lora(ids: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """PEFT's lora.Embedding delta: A is stored [r, vocab], so a row lookup of A^T is the
    shrink: delta = A^T[ids] @ (B^T * s).   ids [n]; a_t [vocab, r]; b_t [r, hidden] -> [n, hidden]."""
    return a_t[ids] @ b_t


def replace_token_rows(x: torch.Tensor, ids: torch.Tensor, token_ids: torch.Tensor,
                       token_rows: torch.Tensor) -> torch.Tensor:
    """PEFT's trainable tokens: embedding rows of token_ids are replaced by token_rows.
    x [n, hidden] (the embeddings of ids [n]); token_ids [k]; token_rows [k, hidden]."""
    match = ids[:, None] == token_ids[None, :]                   # [n, k]
    hit = match.any(dim=1)
    if bool(hit.any()):
        x[hit] = token_rows[match[hit].int().argmax(dim=1)].to(x.dtype)
    return x
