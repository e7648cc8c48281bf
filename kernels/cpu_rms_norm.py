"""RMSNorm on CPU as a C++ op (cpu_rms_norm.cpp), beside its torch reference.

torch has no fused RMSNorm kernel for CPU: `F.rms_norm` runs as pow, mean, rsqrt and mul,
and HF's semantics add a copy to fp32 and one back (the weight multiplies in the input
dtype), so a norm is about six passes over the activation; a decode step has 61 of them
on SmolLM2. The op reads each row twice and writes it once. Built on first use like the
other CPU ops (cpp_build.py); where it cannot build, one warning and the reference.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cpp_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_rms_norm.cpp")
DTYPES = (torch.float32, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """HF's Llama norm `w * norm(x).to(dtype)`, or Gemma's `(norm(x) * (1 + w)).to(dtype)`
    (unit_offset: its checkpoints store w - 1), with norm(x) = x * rsqrt(mean(x^2) + eps)
    in fp32. torch's rms_norm computes that norm bit for bit as HF's five ops do."""
    dtype = x.dtype
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).to(dtype)
    return weight * normed.to(dtype)


def _build():
    return cpp_build.load("cpu_rms_norm", SOURCE, "the CPU RMSNorm op (~10 s)")


@functools.cache
def extension():
    """The compiled module, or None (after one warning) when it cannot be built here."""
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, a compile error: the reference still works
        logger.warning("CPU RMSNorm op unavailable, using torch's ops (cpu_rms_norm.rms_norm_ref): %s", e)
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """rms_norm_ref's result through the op, for CPU tensors of one of DTYPES (others: the reference)."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or weight.dtype != x.dtype or extension() is None:
        return rms_norm_ref(x, weight, eps, unit_offset)
    return extension().rms_norm(x, weight, eps, unit_offset)
