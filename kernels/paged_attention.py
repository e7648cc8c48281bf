"""Attention over a paged KV cache: keys and values live in fixed-size blocks, and each
sequence owns a block table instead of a contiguous buffer.

Layout (one layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
A flat slot is `block * block_size + offset`; slot -1 marks a token that is not stored.

Semantics:
    store_kv:   k_cache.view(-1, H_kv, D)[slot[t]] = k[t]   (same for v), slot[t] >= 0
    attention:  out[t] = softmax(q[t] K_i^T * scale + causal) V_i over the first
                context_len[i] cached tokens of t's sequence i; the sequence's new tokens
                are its last q_len[i] positions (decode: q_len = 1; chunked prefill and
                prefix-cache hits: a cached prefix plus new tokens).

The torch implementations gather a sequence's blocks and call SDPA; they are the CPU
path and the oracle for the Triton kernels beside them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, H_kv, D]; slot_mapping [T] int64 (all >= 0 on the CPU path)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached tokens, [length, H_kv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           max_context_len: int, scale: float) -> torch.Tensor:
    """One new token per sequence. q [B, H, D]; block_tables [B, max_blocks] int64;
    context_lens [B] (including the new token, already stored). Returns [B, H, D]."""
    B, H, D = q.shape
    block_size = k_cache.shape[1]
    num_blocks = -(-max_context_len // block_size)
    tables = block_tables[:, :num_blocks]
    k = k_cache[tables].flatten(1, 2)              # [B, ctx, H_kv, D]
    v = v_cache[tables].flatten(1, 2)
    positions = torch.arange(k.shape[1], device=q.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, ctx]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )                                              # [B, H, 1, D]
    return out.squeeze(2)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_lens: list[int],
                            context_lens: list[int], scale: float) -> torch.Tensor:
    """Several sequences' new tokens, packed. q [T, H, D] with T = sum(query_lens);
    sequence i attends to its first context_lens[i] cached tokens, causally."""
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        qi = q[start : start + q_len].transpose(0, 1).unsqueeze(0)           # [1, H, q, D]
        k = _gather(k_cache, block_tables[i], ctx).transpose(0, 1).unsqueeze(0)
        v = _gather(v_cache, block_tables[i], ctx).transpose(0, 1).unsqueeze(0)
        mask = _causal_mask(q_len, ctx, q.device)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale,
                                           is_causal=mask is None and q_len > 1, enable_gqa=True)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def _causal_mask(q_len: int, ctx: int, device) -> torch.Tensor | None:
    """New token i sits at position ctx - q_len + i and sees keys up to it. None when
    there is no cached prefix (plain causal) or a single query (sees everything)."""
    if q_len == ctx or q_len == 1:
        return None
    q_pos = torch.arange(ctx - q_len, ctx, device=device)
    return torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
