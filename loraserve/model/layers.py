"""The layers every family shares: the per-step ForwardBatch, RMSNorm (both weight
conventions), the LoRA projection, attention over the paged cache, the gated MLP.

The LoRA projection is the one place a base matmul meets its adapter delta
(`kernels.add_lora`): families differ in norms, scales and names, never in how LoRA
is applied. Numerics follow HF transformers so logits match it at fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.adapters import LoRAGroup
from loraserve.kernels import Kernels, LoRABlocks, LoRAMeta

from . import adapter_extras
from .base_weights import BaseWeight


@dataclass
class ForwardBatch:
    """Everything a step's forward pass needs besides the weights, passed down explicitly.
    Tokens are packed: prefill tokens of each prefilling sequence first, then one token
    per decoding sequence."""
    positions: torch.Tensor            # [T] int64
    slot_mapping: torch.Tensor         # [T] int64: KV cache slot of each new token
    num_prefill_tokens: int
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]
    prefill_block_tables: torch.Tensor  # [P, max_blocks] int64
    decode_block_tables: torch.Tensor   # [D, max_blocks] int64
    decode_context_lens: torch.Tensor   # [D] int64
    decode_max_context_len: int
    lora: LoRAMeta | LoRABlocks         # in the form the model's Kernels reads (Kernels.lora_meta)
    extras: adapter_extras.StepExtras | None = None  # DoRA / embed_tokens / lm_head parts; None = none in this step


class RMSNorm(nn.Module):
    """Llama's `w * norm(x)` in the input dtype, or Gemma's `(1 + w) * norm(x)` in fp32
    (`unit_offset`: its checkpoints store w - 1, zeros at init), through the backend's op
    (kernels/cpu_rms_norm.py holds the op and its torch reference)."""

    def __init__(self, size: int, eps: float, unit_offset: bool, kernels: Kernels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps, self.unit_offset)


class LoRAProjection(nn.Module):
    """y = x W^T (+ b) + the LoRA delta of each token's adapter slot. `name` is the slot
    pool's group (qkv, o, gate_up, down); `lora` its buffers, attached after loading.
    `base` is W's serving format (base_weights.py), set after loading; until then the
    loaded Parameters multiply as they are."""

    def __init__(self, name: str, in_features: int, out_features: int, bias: bool, kernels: Kernels):
        super().__init__()
        self.name, self.kernels = name, kernels
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.lora: LoRAGroup | None = None
        self.base: BaseWeight | None = None

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] as a plain matrix, whatever its serving format."""
        return self.base.dense() if self.base is not None else self.weight.detach()

    def forward(self, x: torch.Tensor, batch: "ForwardBatch") -> torch.Tensor:
        y = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)
        meta = batch.lora
        if meta.has_lora and self.lora is not None:
            g = self.lora
            self.kernels.add_lora(y, x, g.A, g.Bs, g.out_slices, meta, scale=g.scale)
            adapter_extras.apply_dora(y, self, g, batch.extras)     # DoRA rows only; nothing without DoRA
        return y


@dataclass(frozen=True)
class AttentionShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool = False
    qk_norm: bool = False              # per-head RMSNorm of q and k before rope (Qwen3, Gemma 3)
    unit_offset_norm: bool = False     # the q/k norms' convention
    eps: float = 1e-6
    scale: float | None = None         # None: head_dim ** -0.5
    window: int | None = None          # sliding window of this layer
    softcap: float | None = None       # attention logit soft-capping


class Attention(nn.Module):
    def __init__(self, s: AttentionShape, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_size, self.kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.qkv = LoRAProjection("qkv", s.hidden, self.q_size + 2 * self.kv_size, s.bias, kernels)
        self.o = LoRAProjection("o", self.q_size, s.hidden, False, kernels)
        self.q_norm = RMSNorm(s.head_dim, s.eps, s.unit_offset_norm, kernels) if s.qk_norm else None
        self.k_norm = RMSNorm(s.head_dim, s.eps, s.unit_offset_norm, kernels) if s.qk_norm else None
        self.scale = s.scale if s.scale is not None else s.head_dim ** -0.5
        self.window, self.softcap = s.window, s.softcap
        self.k_cache: torch.Tensor | None = None   # [num_blocks, block_size, H_kv, D]
        self.v_cache: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv(h, batch)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.kernels.rotate(self.q_norm(q.view(-1, self.num_heads, self.head_dim)), cos, sin)   # [T, H, D]
            k = self.kernels.rotate(self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)), cos, sin)  # [T, H_kv, D]
        else:   # q and k side by side in qkv's rows: one rotation for both
            qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = self.kernels.rotate(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = self._paged(q, k, v, batch)      # k, v: strided views; every store_kv takes them
        return self.o(out.flatten(1), batch)

    def _paged(self, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        kernels = self.kernels
        kernels.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        p = batch.num_prefill_tokens
        extra = dict(window=self.window, softcap=self.softcap)

        def prefill():
            return kernels.paged_attention_prefill(
                q[:p], self.k_cache, self.v_cache, batch.prefill_block_tables,
                batch.prefill_query_lens, batch.prefill_context_lens, self.scale, **extra)

        def decode():
            return kernels.paged_attention_decode(
                q[p:], self.k_cache, self.v_cache, batch.decode_block_tables,
                batch.decode_context_lens, batch.decode_max_context_len, self.scale, **extra)

        if p == 0 or p == q.shape[0]:       # one kind of token: its output as it comes, no copy
            return decode() if p == 0 else prefill()
        out = torch.empty_like(q)
        out[:p], out[p:] = prefill(), decode()
        return out


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str, kernels: Kernels):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up = LoRAProjection("gate_up", hidden, 2 * intermediate, False, kernels)
        self.down = LoRAProjection("down", intermediate, hidden, False, kernels)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate, up = self.gate_up(x, batch).chunk(2, dim=-1)
        return self.down(self.act(gate) * up, batch)
