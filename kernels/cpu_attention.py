"""The CPU path of paged attention, same semantics as paged_attention.py's references.

On CPU the cache is allocated head-major, [H_kv, num_blocks, block_size, D], and handed
around as its permuted view [num_blocks, block_size, H_kv, D] (the kernels' contract).
Head-major storage makes a batch's gather one index_select whose result feeds the
matmuls directly; the token-major layout needs a permute copy of every gathered
K and V, which costs more than the attention arithmetic at decode shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def allocate_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device) -> torch.Tensor:
    """Head-major storage, returned as the [num_blocks, block_size, H_kv, D] view."""
    storage = torch.zeros(num_kv_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)
    return storage.permute(1, 2, 0, 3)


def head_major(cache: torch.Tensor) -> torch.Tensor | None:
    """The [H_kv, num_blocks, block_size, D] storage behind a view, if it is head-major."""
    storage = cache.permute(2, 0, 1, 3)
    return storage if storage.is_contiguous() else None


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, H_kv, D] into their flat slots."""
    for new, cache in ((k, k_cache), (v, v_cache)):
        storage = head_major(cache)
        flat = storage.view(storage.shape[0], -1, storage.shape[-1])      # [H_kv, slots, D]
        flat.index_copy_(1, slot_mapping, new.transpose(0, 1))


def _gather(storage: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[H_kv, B, max_blocks * block_size, D] for block tables [B, max_blocks]. One
    index_select over (head, block) rows: along dim 0 it is a fast contiguous copy,
    along dim 1 it is many times slower."""
    kv, num_blocks, bs, d = storage.shape
    b, nb = block_tables.shape
    rows = (torch.arange(kv, device=storage.device)[:, None] * num_blocks + block_tables.reshape(1, -1)).view(-1)
    return storage.view(kv * num_blocks, bs, d).index_select(0, rows).view(kv, b, nb * bs, d)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           max_context_len: int, scale: float, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]: one query per sequence, GQA, over its context_lens tokens
    (the last `window` of them with a window); scores soft-capped with a softcap."""
    B, H, D = q.shape
    k_store, v_store = head_major(k_cache), head_major(v_cache)
    kv_heads, block_size = k_store.shape[0], k_store.shape[2]
    tables = block_tables[:, : -(-max_context_len // block_size)]
    k = _gather(k_store, tables)                                   # [H_kv, B, ctx, D]
    v = _gather(v_store, tables)
    qg = q.view(B, kv_heads, H // kv_heads, D).transpose(0, 1)     # [H_kv, B, g, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [H_kv, B, g, ctx]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(k.shape[2], device=q.device)[None, :]
    beyond = positions >= context_lens[:, None]                    # [B, ctx]
    if window is not None:
        beyond |= positions <= context_lens[:, None] - 1 - window
    scores.masked_fill_(beyond[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)                                   # [H_kv, B, g, D]
    return out.transpose(0, 1).reshape(B, H, D)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_lens: list[int],
                            context_lens: list[int], scale: float, window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """q [T, H, D] packed; each sequence attends causally to its first context_lens[i]
    cached tokens, its new tokens being the last query_lens[i]; window and softcap as in
    paged_attention.py."""
    k_store, v_store = head_major(k_cache), head_major(v_cache)
    block_size = k_store.shape[2]
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        table = block_tables[i : i + 1, : -(-ctx // block_size)]
        k = _gather(k_store, table)[:, 0, :ctx].unsqueeze(0)       # [1, H_kv, ctx, D]
        v = _gather(v_store, table)[:, 0, :ctx].unsqueeze(0)
        qi = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if window is None and softcap is None:
            o = _causal_sdpa(qi, k, v, q_len, ctx, scale)
        else:
            o = _masked_attention(qi, k, v, q_len, ctx, scale, window, softcap)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def _causal_sdpa(q, k, v, q_len: int, ctx: int, scale: float) -> torch.Tensor:
    """New token i sits at position ctx - q_len + i and sees keys up to it."""
    if q_len == ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scale, enable_gqa=True)
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
    mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _masked_attention(q, k, v, q_len: int, ctx: int, scale: float, window: int | None,
                      softcap: float | None) -> torch.Tensor:
    """Explicit scores, for a sliding window or soft-capping (SDPA cannot cap); a window
    also trims the keys no new token can see. q [1, H, q, D]; k, v [1, H_kv, ctx, D]."""
    lo = 0 if window is None else max(0, ctx - q_len - window + 1)
    k, v = k[:, :, lo:], v[:, :, lo:]
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, k.repeat_interleave(group, dim=1).transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
    k_pos = torch.arange(lo, ctx, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= k_pos <= q_pos - window
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v.repeat_interleave(group, dim=1))
