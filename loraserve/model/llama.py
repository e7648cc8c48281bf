"""Llama-family decoder (Llama, Mistral, Qwen2 with q/k/v bias, SmolLM) over flat tokens.

q,k,v and gate,up are fused into one matmul each, and every projection adds its LoRA
delta from the step's adapter slots. Every kernel call goes through the `Kernels` the
model is built with (kernels/__init__.py select_kernels: chosen once, at engine start). Numerics follow HF
transformers (fp32 RMSNorm, HF's rotary tables) so logits match it at fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.kernels import Kernels, LoRABlocks, LoRAMeta

from loraserve.adapters import LoRAGroup

from . import adapter_extras


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
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos, sin [T, 1, D] (HF's rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        h, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, head_dim
        self.q_size, self.kv_size = nh * head_dim, nkv * head_dim
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=bias)
        self.o = nn.Linear(self.q_size, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, h, bias=False)
        self.input_norm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_norm = RMSNorm(h, config.rms_norm_eps)
        self.scale = head_dim ** -0.5
        self.lora: dict[str, LoRAGroup] = {}
        self.k_cache: torch.Tensor | None = None   # [num_blocks, block_size, H_kv, D]
        self.v_cache: torch.Tensor | None = None

    def _proj(self, name: str, linear: nn.Linear, x: torch.Tensor, meta: LoRAMeta | LoRABlocks,
              extras: adapter_extras.StepExtras | None = None) -> torch.Tensor:
        y = linear(x)
        if meta.has_lora:
            g = self.lora[name]
            self.kernels.add_lora(y, x, g.A, g.Bs, g.out_slices, meta)
            adapter_extras.apply_dora(y, linear, g, extras)
        return y

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.input_norm(x)
        qkv = self._proj("qkv", self.qkv, h, batch.lora, batch.extras)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rotate(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = rotate(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        attn = self._attention(q, k.contiguous(), v.contiguous(), batch)
        x = x + self._proj("o", self.o, attn.flatten(1), batch.lora, batch.extras)
        h = self.post_attention_norm(x)
        gate, up = self._proj("gate_up", self.gate_up, h, batch.lora, batch.extras).chunk(2, dim=-1)
        return x + self._proj("down", self.down, F.silu(gate) * up, batch.lora, batch.extras)

    def _attention(self, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        kernels = self.kernels
        kernels.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        p = batch.num_prefill_tokens
        out = torch.empty_like(q)
        if p:
            out[:p] = kernels.paged_attention_prefill(
                q[:p], self.k_cache, self.v_cache, batch.prefill_block_tables,
                batch.prefill_query_lens, batch.prefill_context_lens, self.scale)
        if p < q.shape[0]:
            out[p:] = kernels.paged_attention_decode(
                q[p:], self.k_cache, self.v_cache, batch.decode_block_tables,
                batch.decode_context_lens, batch.decode_max_context_len, self.scale)
        return out


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, max_position: int, kernels: Kernels):
        super().__init__()
        self.config = config
        self.kernels = kernels
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.head_dim, kernels) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.max_position = max_position
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def init_rotary(self, dtype: torch.dtype) -> None:
        """Precompute HF's own rotary tables (every rope_type it knows) for all positions."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaRotaryEmbedding(self.config)
        positions = torch.arange(self.max_position)[None]
        cos, sin = rope(torch.empty(0, dtype=dtype), positions)
        device = self.embed.weight.device
        self.cos, self.sin = cos[0, :, None].to(device), sin[0, :, None].to(device)  # [max_pos, 1, D]

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = adapter_extras.embed_tokens(self.embed, input_ids, batch.extras)   # [T, hidden]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]
        for layer in self.layers:
            x = layer(x, cos, sin, batch)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, extras: adapter_extras.StepExtras | None = None) -> torch.Tensor:
        weight = self.embed.weight if self.tie else self.lm_head.weight
        return adapter_extras.compute_logits(hidden, weight, self.tie, extras)

    def load_hf_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Map HF names onto the fused layout (q,k,v -> qkv; gate,up -> gate_up)."""
        get = lambda name: state.pop(name)
        with torch.no_grad():
            self.embed.weight.copy_(get("model.embed_tokens.weight"))
            self.norm.weight.copy_(get("model.norm.weight"))
            if self.lm_head is not None:
                self.lm_head.weight.copy_(get("lm_head.weight"))
            for i, layer in enumerate(self.layers):
                pre = f"model.layers.{i}."
                attn = pre + "self_attn."
                layer.qkv.weight.copy_(torch.cat([get(attn + f"{m}_proj.weight") for m in "qkv"]))
                if layer.qkv.bias is not None:
                    layer.qkv.bias.copy_(torch.cat([get(attn + f"{m}_proj.bias") for m in "qkv"]))
                layer.o.weight.copy_(get(attn + "o_proj.weight"))
                layer.gate_up.weight.copy_(torch.cat([get(pre + "mlp.gate_proj.weight"), get(pre + "mlp.up_proj.weight")]))
                layer.down.weight.copy_(get(pre + "mlp.down_proj.weight"))
                layer.input_norm.weight.copy_(get(pre + "input_layernorm.weight"))
                layer.post_attention_norm.weight.copy_(get(pre + "post_attention_layernorm.weight"))
        state.pop("lm_head.weight", None)          # tied checkpoints may carry a copy
        unused = [k for k in state if "rotary_emb" not in k]
        if unused:
            raise ValueError(f"checkpoint has weights this model does not use: {unused[:5]}")

    def attach_lora(self, layers: list[dict[str, LoRAGroup]]) -> None:
        """Read LoRA weights from the slot pool's buffers (one dict of groups per layer, in
        the fused layout of this model: qkv, o, gate_up, down)."""
        assert len(layers) == len(self.layers), (len(layers), len(self.layers))
        for layer, groups in zip(self.layers, layers):
            layer.lora = groups

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        shape = (num_blocks, block_size, self.config.num_key_value_heads, self.head_dim)
        for layer in self.layers:
            layer.k_cache = self.kernels.allocate_kv_cache(*shape, dtype, device)
            layer.v_cache = self.kernels.allocate_kv_cache(*shape, dtype, device)


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
