"""Pure tensor functions for LoRA and paged attention.

One branch chooses the implementation: Triton kernels on CUDA, the torch paths
elsewhere (CPU production path and the kernels' oracle). The Triton launchers are also
importable by name, and run on CPU tensors under TRITON_INTERPRET=1 (the kernel tests).
"""

from __future__ import annotations

import contextlib

import torch

from . import cpu_attention as _cpu
from .lora_meta import LoRAMeta, LoRAMetaBuffers, build_lora_meta
from .paged_attention import (
    paged_attention_decode_triton,
    paged_attention_prefill_triton,
    store_kv_triton,
)
from .sgmv import (
    HAS_TRITON,
    add_lora_bgmv,
    add_lora_grouped,
    add_lora_ref,
    add_lora_sgmv,
    add_lora_triton,
    bgmv_expand,
    bgmv_shrink,
    sgmv_expand,
    sgmv_shrink,
)
from .sgmv_cpu import add_lora_cpu, warm_up as warm_up_cpu_lora
from .triton_support import triton

_triton_on_cpu = False


def use_triton(t: torch.Tensor) -> bool:
    """The one dispatch branch: Triton on CUDA tensors when triton is installed."""
    return HAS_TRITON and (t.is_cuda or _triton_on_cpu)


@contextlib.contextmanager
def triton_on_cpu():
    """Take the CUDA path's kernels on CPU tensors too (through TRITON_INTERPRET=1), so CI
    can run a whole model, CUDA-graph replay included, the way a GPU would."""
    global _triton_on_cpu
    assert HAS_TRITON and triton.knobs.runtime.interpret, "needs triton with TRITON_INTERPRET=1"
    _triton_on_cpu = True
    try:
        yield
    finally:
        _triton_on_cpu = False


def add_lora(y, x, A, Bs, out_slices, meta: LoRAMeta):
    """y += LoRA delta of each token's adapter (semantics in kernels/sgmv.py); returns y."""
    impl = add_lora_triton if use_triton(x) else add_lora_cpu
    return impl(y, x, A, Bs, out_slices, meta)


def allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device) -> torch.Tensor:
    """A [num_blocks, block_size, H_kv, D] cache: contiguous for the Triton kernels,
    a view of head-major storage for the CPU path (see cpu_attention.py)."""
    if torch.device(device).type == "cuda" or _triton_on_cpu:
        return torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    return _cpu.allocate_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    impl = store_kv_triton if use_triton(k) else _cpu.store_kv
    impl(k, v, k_cache, v_cache, slot_mapping)


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale):
    impl = paged_attention_decode_triton if use_triton(q) else _cpu.paged_attention_decode
    return impl(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale)


def paged_attention_prefill(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale):
    impl = paged_attention_prefill_triton if use_triton(q) else _cpu.paged_attention_prefill
    return impl(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale)


__all__ = [
    "HAS_TRITON", "LoRAMeta", "LoRAMetaBuffers", "build_lora_meta", "use_triton", "triton_on_cpu",
    "add_lora", "add_lora_cpu", "warm_up_cpu_lora", "add_lora_ref", "add_lora_grouped",
    "add_lora_triton", "add_lora_sgmv", "add_lora_bgmv",
    "sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand",
    "paged_attention_decode", "paged_attention_prefill", "store_kv", "allocate_kv_cache",
    "paged_attention_decode_triton", "paged_attention_prefill_triton", "store_kv_triton",
]
