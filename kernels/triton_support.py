"""What every Triton launcher here shares: the optional import and how a kernel is
compiled (or interpreted) at its first launch."""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                                # CPU installs without triton
    triton = tl = None
    HAS_TRITON = False


@functools.cache
def _jit(fn, interpret: bool):
    return triton.jit(fn)


def kernel(fn):
    """triton.jit at first launch rather than at import: triton picks the interpreter when
    a kernel is decorated, and TRITON_INTERPRET may be set after a module is imported."""
    return _jit(fn, bool(triton.knobs.runtime.interpret))


def dot_dtype(dtype: torch.dtype):
    """Operand type of tl.dot. The interpreter multiplies bf16 operands as raw uint16, so
    there every dot runs in fp32 (products of bf16/fp16 values are exact in fp32)."""
    if triton.knobs.runtime.interpret or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
