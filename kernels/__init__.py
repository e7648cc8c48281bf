"""Pure tensor functions for LoRA and paged attention.

The one dispatch point: `select_kernels(device, backend)` picks, once at engine start,
one implementation of every op and returns it as a frozen `Kernels`, which the model
calls. "triton" (the default on CUDA) runs the Triton kernels, and on CPU tensors runs
them through the interpreter (TRITON_INTERPRET=1: how CI tests the CUDA path, graph
replay included); "torch" (the default elsewhere) runs the torch paths, with the C++
LoRA op on CPU when it builds. Every implementation is also importable by name, for the
kernel tests and benchmarks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import cpu_attention as _cpu
from . import cpu_paged_attention as _cpu_op
from . import cpu_rms_norm, cpu_rope, sgmv_cpu
from .lora_meta import LoRABlocks, LoRAMeta, LoRAMetaBuffers, LoRARows, build_lora_meta, triton_lora_meta
from .paged_attention import (
    paged_attention_decode_triton,
    paged_attention_prefill_triton,
    store_kv_triton,
)
from .sgmv import (
    DEFAULT_LAUNCH,
    HAS_TRITON,
    GpuLaunch,
    add_lora_bgmv,
    add_lora_ref,
    add_lora_sgmv,
    add_lora_triton,
    bgmv_expand,
    bgmv_shrink,
    sgmv_expand,
    sgmv_shrink,
)
from .sgmv_cpu import add_lora_cpu, warm_up as warm_up_cpu_lora
from .sgmv_grouped import add_lora_grouped
from .triton_support import triton

KERNEL_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Kernels:
    """One implementation of every op, chosen once. The model reads the step's LoRA
    metadata in the form this backend's add_lora takes (`lora_meta`: a `LoRABlocks` for
    Triton, the core `LoRAMeta` for torch); both have `has_lora`."""
    name: str                      # "triton" or "torch"
    lora_meta: Callable            # (token_slots, slot_ranks, device) -> the step's LoRA metadata
    add_lora: Callable             # (y, x, A, Bs, out_slices, meta) -> y, updated in place
    store_kv: Callable
    paged_attention_decode: Callable
    paged_attention_prefill: Callable
    allocate_kv_cache: Callable    # (num_blocks, block_size, H_kv, D, dtype, device) in this backend's layout
    rms_norm: Callable = cpu_rms_norm.rms_norm_ref   # (x, weight, eps, unit_offset) -> HF's RMSNorm of x
    rotate: Callable = cpu_rope.rotate_ref           # (x [T, heads, D], cos, sin [T, 1, R]) -> x rotated
    launch: GpuLaunch | None = None  # block sizes of the compiled Triton launches


def select_kernels(device: torch.device | str, backend: str = "auto", launch: GpuLaunch = DEFAULT_LAUNCH) -> Kernels:
    """The one branch: Triton on CUDA when triton is installed, else the torch paths;
    `backend` "triton" or "torch" forces one (EngineConfig.kernel_backend)."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    return triton_kernels(device, launch) if backend == "triton" else torch_kernels(device)


def triton_kernels(device: torch.device, launch: GpuLaunch = DEFAULT_LAUNCH) -> Kernels:
    if not HAS_TRITON:
        raise ValueError("kernel backend 'triton' needs triton: pip install triton")
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"kernel backend 'triton' on {device.type} runs the kernels through Triton's "
                         "interpreter: set TRITON_INTERPRET=1 before the first kernel launch")
    return Kernels(
        name="triton", lora_meta=triton_lora_meta, add_lora=functools.partial(add_lora_triton, launch=launch),
        store_kv=store_kv_triton, paged_attention_decode=paged_attention_decode_triton,
        paged_attention_prefill=paged_attention_prefill_triton, allocate_kv_cache=_contiguous_cache, launch=launch,
    )


def torch_kernels(device: torch.device) -> Kernels:
    """On CPU, the C++ LoRA, paged-attention, RMSNorm and rotary ops are built (or loaded)
    here, once: without a compiler the backend takes add_lora_grouped, the gather attention
    path and torch's norm and rotary ops."""
    cpu = device.type == "cpu"
    use_op = cpu and sgmv_cpu.extension() is not None
    attn = _cpu_op if cpu and _cpu_op.extension() is not None else _cpu
    norm = cpu_rms_norm.rms_norm if cpu and cpu_rms_norm.extension() is not None else cpu_rms_norm.rms_norm_ref
    rotate = cpu_rope.rotate if cpu and cpu_rope.extension() is not None else cpu_rope.rotate_ref
    return Kernels(
        name="torch", lora_meta=build_lora_meta, add_lora=add_lora_cpu if use_op else add_lora_grouped,
        store_kv=attn.store_kv, paged_attention_decode=attn.paged_attention_decode,
        paged_attention_prefill=attn.paged_attention_prefill, allocate_kv_cache=_cpu.allocate_cache, rms_norm=norm,
        rotate=rotate,
    )


def _contiguous_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device) -> torch.Tensor:
    """[num_blocks, block_size, H_kv, D], contiguous: the Triton kernels' layout (the
    torch path's is head-major, see cpu_attention.py)."""
    return torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


__all__ = [
    "HAS_TRITON", "KERNEL_BACKENDS", "Kernels", "select_kernels", "triton_kernels", "torch_kernels", "GpuLaunch",
    "DEFAULT_LAUNCH", "LoRAMeta", "LoRARows", "LoRABlocks", "LoRAMetaBuffers", "build_lora_meta", "triton_lora_meta",
    "add_lora_cpu", "warm_up_cpu_lora", "add_lora_ref", "add_lora_grouped",
    "add_lora_triton", "add_lora_sgmv", "add_lora_bgmv",
    "sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand",
    "paged_attention_decode_triton", "paged_attention_prefill_triton", "store_kv_triton",
]
