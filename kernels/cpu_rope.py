"""The rotary embedding on CPU as a C++ op (cpu_rope.cpp), beside its torch reference.

torch runs the rotation as five ops (slices, neg, cat, two muls, an add), each writing a
whole activation; the op makes one pass over q and k, bit for bit the reference (the same
products and sum, each rounded to the dtype as torch rounds it). Built on first use like
the other CPU ops (cpp_build.py); where it cannot build, one warning and the reference.
(A silu(gate) * up op measured slower than torch's two vectorized ops here and was left out.)
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from . import cpp_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_rope.cpp")
DTYPES = (torch.float32, torch.bfloat16)


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos, sin [T, 1, R], R <= D (HF's rotate_half convention on the
    first R dims; the rest pass through, as with Phi's partial rotary)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((rotate_ref(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _build():
    return cpp_build.load("cpu_rope", SOURCE, "the CPU rotary op (~10 s)",
                          [*cpp_build.CFLAGS, "-ffp-contract=off"])


@functools.cache
def extension():
    """The compiled module, or None (after one warning) when it cannot be built here."""
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, a compile error: the reference still works
        logger.warning("CPU rotary op unavailable, using torch's ops (cpu_rope.rotate_ref): %s", e)
        return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_ref's result through the op, for CPU tensors of one of DTYPES with D, cos and
    sin contiguous (others: the reference)."""
    takes = (x.device.type == "cpu" and x.dtype in DTYPES and cos.dtype == sin.dtype == x.dtype
             and x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous())
    if not takes or extension() is None:
        return rotate_ref(x, cos, sin)
    return extension().rotate(x, cos, sin)
