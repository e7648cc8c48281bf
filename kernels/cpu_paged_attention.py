"""CPU paged attention as a C++ op (cpu_paged_attention.cpp), built on first use with
torch.utils.cpp_extension, the same way as the CPU SGMV op (sgmv_cpu.py).

Semantics (paged_attention.py's, plus two options):
    out[t, h] = softmax(cap(q[t, h] K^T * scale) + mask) V over t's sequence, K and V of
    kv head h // G; cap(s) = softcap * tanh(s / softcap) when softcap is set; a query at
    absolute position p sees keys k with p - window < k <= p (window None: all k <= p).

The op reads K/V rows in place through the block tables (any cache strides with head_dim
contiguous, so both the head-major CPU cache and the token-major one), with no gather
copy; each K/V row is widened to fp32 once and used by the G query heads that share it;
fp32 accumulation with an online softmax; work items (query tile x kv head) split over
the threads. The torch backend builds it once at engine start (kernels/__init__.py
`select_kernels`); when it cannot build, one warning and the gather path
(cpu_attention.py) is used instead.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from . import cpp_build, cpu_attention

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_paged_attention.cpp")
DTYPES = (torch.float32, torch.bfloat16)


def _build():
    return cpp_build.load("cpu_paged_attention", SOURCE, "the CPU paged-attention op (~15 s)")


@functools.cache
def extension():
    """The compiled module, or None (after one warning) when it cannot be built here."""
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, a compile error: the gather path still works
        logger.warning("CPU paged-attention op unavailable, using the gather path (cpu_attention.py): %s", e)
        return None


def _options(window: int | None, softcap: float | None) -> tuple[int, float]:
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    return (window or 0), float(softcap or 0.0)


def _extra(window, softcap) -> dict:
    """The options for the gather path, only when set (its signature gains them separately)."""
    return {name: x for name, x in (("window", window), ("softcap", softcap)) if x is not None}


def _tables(block_tables: torch.Tensor) -> torch.Tensor:
    if block_tables.dtype != torch.int64 or block_tables.stride(-1) != 1:
        block_tables = block_tables.to(torch.int64).contiguous()
    return block_tables


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, H_kv, D] into their flat slots (cpu_attention.store_kv's contract), one
    row copy per token and head instead of two index_copy_ calls."""
    if k.dtype not in DTYPES:
        return cpu_attention.store_kv(k, v, k_cache, v_cache, slot_mapping)
    extension().store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           max_context_len: int, scale: float, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """One new token per sequence. q [B, H, D]; block_tables [B, max_blocks]; context_lens
    [B] (including the new token, already stored). Returns [B, H, D]. max_context_len is
    not needed: each work item loops to its own context length."""
    if q.dtype not in DTYPES:                      # fp16: the gather path
        return cpu_attention.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens,
                                                    max_context_len, scale, **_extra(window, softcap))
    w, cap = _options(window, softcap)
    return extension().decode(q, k_cache, v_cache, _tables(block_tables), context_lens, scale, w, cap)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_lens: list[int],
                            context_lens: list[int], scale: float, window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Several sequences' new tokens, packed. q [T, H, D] with T = sum(query_lens);
    sequence i attends to its first context_lens[i] cached tokens, causally."""
    if q.dtype not in DTYPES:
        return cpu_attention.paged_attention_prefill(q, k_cache, v_cache, block_tables, query_lens,
                                                     context_lens, scale, **_extra(window, softcap))
    w, cap = _options(window, softcap)
    return extension().prefill(q, k_cache, v_cache, _tables(block_tables), list(query_lens),
                               list(context_lens), scale, w, cap)
