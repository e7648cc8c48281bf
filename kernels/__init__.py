"""Pure tensor functions for LoRA and paged attention.

One branch chooses the implementation: Triton kernels on CUDA, the torch paths
elsewhere (CPU production path and the kernels' oracle).
"""

from .lora_meta import LoRAMeta, build_lora_meta
from .paged_attention import paged_attention_decode, paged_attention_prefill, store_kv
from .sgmv import add_lora_grouped, add_lora_ref

add_lora = add_lora_grouped

__all__ = [
    "LoRAMeta", "build_lora_meta", "add_lora", "add_lora_ref", "add_lora_grouped",
    "paged_attention_decode", "paged_attention_prefill", "store_kv",
]
