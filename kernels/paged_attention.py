"""Attention over a paged KV cache: keys and values live in fixed-size blocks, and each
sequence owns a block table instead of a contiguous buffer.

Layout (one layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
A flat slot is `block * block_size + offset`; slot -1 marks a token that is not stored.

Semantics:
    store_kv:   k_cache.view(-1, H_kv, D)[slot[t]] = k[t]   (same for v), slot[t] >= 0
    attention:  out[t] = softmax(cap(q[t] K_i^T * scale) + mask) V_i over the first
                context_len[i] cached tokens of t's sequence i; the sequence's new tokens
                are its last q_len[i] positions (decode: q_len = 1; chunked prefill and
                prefix-cache hits: a cached prefix plus new tokens).
                mask: a query at position p sees key k iff k <= p and, with a sliding
                `window`, p - window < k (HF's `kv_idx > q_idx - sliding_window`).
                cap(s) = softcap * tanh(s / softcap) with `softcap` (Gemma 2), else s.

The torch implementations gather a sequence's blocks and call SDPA; they are the CPU
path and the oracle for the Triton kernels beside them (`store_kv_triton`,
`paged_attention_decode_triton`, `paged_attention_prefill_triton`: the same signatures).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .triton_support import HAS_TRITON, dot_dtype, kernel, tl, triton


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
                           max_context_len: int, scale: float, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """One new token per sequence. q [B, H, D]; block_tables [B, max_blocks] int64;
    context_lens [B] (including the new token, already stored). Returns [B, H, D]."""
    block_size = k_cache.shape[1]
    num_blocks = -(-max_context_len // block_size)
    tables = block_tables[:, :num_blocks]
    k = k_cache[tables].flatten(1, 2)              # [B, ctx, H_kv, D]
    v = v_cache[tables].flatten(1, 2)
    positions = torch.arange(k.shape[1], device=q.device)
    mask = _visible(positions, context_lens[:, None] - 1, context_lens[:, None], window)   # [B, ctx]
    out = _attend(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :], scale, softcap)
    return out.squeeze(2)                          # [B, H, D]


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_lens: list[int],
                            context_lens: list[int], scale: float, window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Several sequences' new tokens, packed. q [T, H, D] with T = sum(query_lens);
    sequence i attends to its first context_lens[i] cached tokens, causally."""
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        qi = q[start : start + q_len].transpose(0, 1).unsqueeze(0)           # [1, H, q, D]
        k = _gather(k_cache, block_tables[i], ctx).transpose(0, 1).unsqueeze(0)
        v = _gather(v_cache, block_tables[i], ctx).transpose(0, 1).unsqueeze(0)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]     # [q, 1]
        mask = _visible(torch.arange(ctx, device=q.device), q_pos, ctx, window)
        out[start : start + q_len] = _attend(qi, k, v, mask, scale, softcap)[0].transpose(0, 1)
        start += q_len
    return out


def _visible(key_pos: torch.Tensor, q_pos: torch.Tensor, ctx, window: int | None) -> torch.Tensor:
    """Which keys a query sees: k <= p, k < ctx, and p - window < k with a window."""
    mask = (key_pos <= q_pos) & (key_pos < ctx)
    return mask if window is None else mask & (key_pos > q_pos - window)


def _attend(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """q [.., H, q, D], k, v [.., H_kv, ctx, D]; SDPA, or explicit fp32 math when the
    scores are soft-capped (SDPA has no hook between the scale and the softmax)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------------
# Triton kernels. Keys are gathered token by token through the block table
# (slot = table[pos // block_size] * block_size + pos % block_size), so one tile of
# BLOCK_N keys may span several small cache blocks and any block size works.

def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Semantics: k_cache.view(-1, H_kv, D)[slot[t]] = k[t], the same for v; slot -1 skipped.
    Grid (token,)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < NUM_KV_HEADS * HEAD_DIM
    h = offs // HEAD_DIM
    d = offs % HEAD_DIM
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + offs
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)


def _paged_decode_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    scale, window, softcap, stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Semantics: out[b, h] = softmax(cap(q[b, h] K_b^T * scale)) V_b over the first
    context_lens[b] cached tokens (the last `window` of them with HAS_WINDOW), K_b, V_b
    of kv head h // GROUP. Grid (sequence, kv head):
    a program holds the GROUP query heads that share its kv head (GQA) and streams the
    sequence's keys once, with an online softmax."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)        # [GROUP_PAD, D_PAD]
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, D_PAD), dtype=tl.float32)
    kv_col = kvh * HEAD_DIM + offs_d[None, :]
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)                                 # the first key in the window
    for n0 in range(lo, ctx, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < ctx
        block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=p_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_ptrs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_col
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)       # [BLOCK_N, D_PAD]
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * scale
        if HAS_SOFTCAP:                                                   # softcap * tanh(s / softcap)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = s * 1.4426950408889634                                        # log2(e), for exp2
        s = tl.where(p_mask[None, :], s, float("-inf"))                   # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                    # ctx 0 (padding): zeros
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def _paged_prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    tile_seqs_ptr, tile_starts_ptr, q_starts_ptr, context_lens_ptr,
    scale, window, softcap, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, TILE_TOKENS: tl.constexpr,
    BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Semantics: out[t, h] = softmax(cap(q[t, h] K^T * scale) + mask) V over its sequence's
    cached tokens 0..pos(t) (pos(t) - window + 1..pos(t) with HAS_WINDOW), pos(t) =
    context_len - q_len + (t's index among the new tokens). Grid (query tile, kv head): a tile is TILE_TOKENS new tokens of one sequence
    times the GROUP query heads of one kv head, BLOCK_R = TILE_TOKENS * GROUP rows (padded)."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile).to(tl.int64)
    first = tl.load(tile_starts_ptr + tile)             # index of the tile's first new token
    q_start = tl.load(q_starts_ptr + seq)
    q_len = tl.load(q_starts_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    offs_r = tl.arange(0, BLOCK_R)
    tok = first + offs_r // GROUP
    heads = kvh * GROUP + offs_r % GROUP
    r_mask = (offs_r < TILE_TOKENS * GROUP) & (tok < q_len)
    q_pos = ctx - q_len + tok                                            # [BLOCK_R]
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)      # [BLOCK_R, D_PAD]
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, D_PAD), dtype=tl.float32)
    kv_col = kvh * HEAD_DIM + offs_d[None, :]
    end = tl.minimum(ctx, ctx - q_len + first + TILE_TOKENS)            # keys the tile can see
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - q_len + first - window + 1, 0)            # the tile's first query's window
    for n0 in range(lo, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=p_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_ptrs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_col
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * scale
        if HAS_SOFTCAP:                                                   # softcap * tanh(s / softcap)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = s * 1.4426950408889634                                        # log2(e), for exp2; [BLOCK_R, BLOCK_N]
        seen = p_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            seen = seen & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # a row with no key seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------
# Launchers: the torch functions' signatures, with the contract asserted.

def _block_n(dtype: torch.dtype) -> int:
    """Keys per tile: 64, or 32 for fp32 so a prefill tile's shared memory fits an A100."""
    return 32 if dtype == torch.float32 else 64


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "[num_blocks, block_size, H_kv, D]"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype and k_cache.device == v_cache.device


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """k, v [T, H_kv, D] (rows may be strided views of a fused qkv); slot_mapping [T] int,
    -1 = not stored."""
    _check_caches(k_cache, v_cache)
    T, H_kv, D = k.shape
    assert v.shape == k.shape and k_cache.shape[2:] == (H_kv, D), (k.shape, v.shape, k_cache.shape)
    assert k.dtype == v.dtype == k_cache.dtype, (k.dtype, k_cache.dtype)
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert slot_mapping.shape == (T,) and not slot_mapping.is_floating_point()
    if T == 0:
        return
    kernel(_store_kv_kernel)[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=H_kv, HEAD_DIM=D, BLOCK=triton.next_power_of_2(H_kv * D),
    )


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor) -> int:
    """Return the GQA group size."""
    _check_caches(k_cache, v_cache)
    assert q.dim() == 3 and q.stride(2) == 1, "q [tokens, H, D], head_dim contiguous"
    assert q.dtype == k_cache.dtype and q.device == k_cache.device, (q.dtype, k_cache.dtype)
    H, D = q.shape[1:]
    H_kv = k_cache.shape[2]
    assert D == k_cache.shape[3] and H % H_kv == 0, (q.shape, k_cache.shape)
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1 and not block_tables.is_floating_point()
    return H // H_kv


def paged_attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  max_context_len: int, scale: float, window: int | None = None,
                                  softcap: float | None = None) -> torch.Tensor:
    """One new token per sequence. q [B, H, D]; block_tables [B, max_blocks];
    context_lens [B] (including the new token, already stored). Returns [B, H, D].
    max_context_len is not needed: each program loops to its own context length."""
    group = _check_attention(q, k_cache, v_cache, block_tables)
    B, H, D = q.shape
    assert context_lens.shape == (B,) and block_tables.shape[0] == B
    out = torch.empty_like(q)
    if B == 0:
        return out
    H_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    kernel(_paged_decode_kernel)[(B, H_kv)](
        out, q, k_cache, v_cache, block_tables, context_lens,
        scale, window or 0, softcap or 0.0, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        NUM_KV_HEADS=H_kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=block_size,
        BLOCK_N=_block_n(q.dtype), DOT_DTYPE=dot_dtype(q.dtype),
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
    )
    return out


def paged_attention_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, query_lens: list[int],
                                   context_lens: list[int], scale: float, window: int | None = None,
                                   softcap: float | None = None) -> torch.Tensor:
    """Several sequences' new tokens, packed. q [T, H, D] with T = sum(query_lens);
    sequence i attends to its first context_lens[i] cached tokens, causally."""
    group = _check_attention(q, k_cache, v_cache, block_tables)
    T, H, D = q.shape
    assert T == sum(query_lens) and len(query_lens) == len(context_lens) <= block_tables.shape[0]
    assert all(0 < n <= c for n, c in zip(query_lens, context_lens)), (query_lens, context_lens)
    out = torch.empty_like(q)
    if T == 0:
        return out
    H_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    block_r = max(64, triton.next_power_of_2(group))   # rows = new tokens x query heads of a kv head
    tile_tokens = block_r // group
    num_tiles, tiles = _prefill_tiles(tuple(query_lens), tuple(context_lens), tile_tokens, q.device)
    tile_seqs, tile_starts, q_starts, ctx_lens = tiles
    kernel(_paged_prefill_kernel)[(num_tiles, H_kv)](
        out, q, k_cache, v_cache, block_tables, tile_seqs, tile_starts, q_starts, ctx_lens,
        scale, window or 0, softcap or 0.0, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        NUM_KV_HEADS=H_kv, GROUP=group, TILE_TOKENS=tile_tokens, BLOCK_R=block_r,
        HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=block_size,
        BLOCK_N=_block_n(q.dtype), DOT_DTYPE=dot_dtype(q.dtype),
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
    )
    return out


@functools.lru_cache(maxsize=16)
def _prefill_tiles(query_lens: tuple, context_lens: tuple, tile_tokens: int, device):
    """The step's query tiles, built once per step and shared by every layer (one copy to
    the device): tile_seqs, tile_starts [num_tiles]; q_starts [N+1]; context_lens [N]."""
    tile_seqs, tile_starts, q_starts = [], [], [0]
    for i, q_len in enumerate(query_lens):
        for first in range(0, q_len, tile_tokens):
            tile_seqs.append(i)
            tile_starts.append(first)
        q_starts.append(q_starts[-1] + q_len)
    flat = torch.tensor(tile_seqs + tile_starts + q_starts + list(context_lens), dtype=torch.int32)
    flat = flat.to(device)
    n, N = len(tile_seqs), len(query_lens)
    return n, (flat[:n], flat[n : 2 * n], flat[2 * n : 2 * n + N + 1], flat[2 * n + N + 1 :])
