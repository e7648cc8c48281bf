"""CPU SGMV as a C++ op (sgmv_cpu.cpp), built on first use with torch.utils.cpp_extension.

Semantics: y[t, off_p : off_p + out_p] += (x[t] @ A[slot[t], :, :rank, p]) @ B_p[slot[t], :rank]
for every token t with slot[t] >= 0 (weight layout in sgmv.py); tokens with slot -1 are untouched.

A decode step has a few tokens per adapter, so the LoRA delta is bound by reading the
adapters' weights: oneDNN's small-M batched matmuls (add_lora_grouped) stream them at a
fraction of the memory bandwidth. The op streams each adapter's A and B once per block of
up to 16 tokens that share it, at the adapter's own rank, with both cores on disjoint
blocks (SmolLM2, 32 rank-16 adapters x 4 tokens, bf16: ~9 ms a decode step, ~30 ms
batched). Segments longer than MAX_SEG_LEN tokens (long prefill chunks) run inside the
op as ATen matmuls, which win once the weights are reused by enough tokens.

The build (~10 s, once per machine: cached under the user cache dir, keyed by source,
flags, torch and CPU) needs a C++ compiler and ninja; the torch backend builds it once
at engine start (kernels/__init__.py `select_kernels`) and, if it fails, logs one warning
and takes add_lora_grouped from then on. add_lora_cpu called directly falls back the same
way, and for inputs the op does not take.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from . import cpp_build
from .lora_meta import LoRAMeta
from .sgmv_grouped import add_lora_grouped

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sgmv_cpu.cpp")
# Segments longer than this go to ATen matmuls inside the op. Measured on SmolLM2 shapes
# (rank 16, 2 cores, AVX-512 without AMX), one segment of n tokens, op vs ATen: bf16 n=512
# 5.2 vs 5.5 ms, n=768 7.5 vs 6.9 (ATen's bf16 dot products pay off once weights are
# reused enough); fp32 n=2048 38 vs 43 ms, so fp32 stays on the op for any prefill chunk.
MAX_SEG_LEN = {torch.bfloat16: 512, torch.float32: 2048}


def _build():
    return cpp_build.load("sgmv_cpu", SOURCE, "the CPU SGMV op (~10 s)")


@functools.cache
def extension():
    """The compiled module, or None (after one warning) when it cannot be built here."""
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, a compile error: the torch path still works
        logger.warning("CPU SGMV op unavailable, using the torch path (add_lora_grouped): %s", e)
        return None


def warm_up() -> None:
    """Build or load the op at engine start, not inside the first request with an adapter."""
    extension()


def add_lora_cpu(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                 out_slices: list[tuple[int, int]], meta: LoRAMeta, scale: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path: y += LoRA delta through the C++ op; add_lora_grouped for what it does not
    take (other dtypes, strided tensors) or when it could not be built. Returns y. int8
    slots (A, Bs int8 with `scale`, slot_pool.LoRAGroup) convert their codes in the op."""
    if not meta.has_lora:
        return y                                   # no adapter in the step: no work at all
    ext = extension() if _supported(y, x, A, Bs, scale) else None
    if ext is None:
        return add_lora_grouped(y, x, A, Bs, out_slices, meta, scale)
    ext.add_lora(y, x, A, Bs, [off for off, _ in out_slices], meta.sorted_token_idx,
                 meta.seg_starts, meta.seg_slots, meta.slot_ranks, MAX_SEG_LEN[y.dtype],
                 _NO_SCALE if scale is None else scale)
    return y


_NO_SCALE = torch.empty(0)


def _supported(y, x, A, Bs, scale) -> bool:
    weights = torch.int8 if scale is not None else y.dtype
    return (y.dtype in MAX_SEG_LEN and x.dtype == y.dtype and A.dtype == weights and not y.is_cuda
            and y.stride(-1) == 1 and x.stride(-1) == 1 and A.is_contiguous()
            and (scale is None or (scale.dtype == torch.float32 and scale.is_contiguous()))
            and all(B.dtype == weights and B.is_contiguous() for B in Bs))
