"""The decoder every family is built from: embeddings, N layers of (norm, attention,
norm, gated MLP) with optional sandwich norms, a final norm and the LM head.

A family (llama.py, qwen3.py, gemma2.py, ...) is a subclass that states its `Arch`
(what differs: norms, scales, soft-caps, windows, rope per layer) and, where its
checkpoint names differ, `layer_sources`. Every kernel call goes through the `Kernels`
the model is built with (kernels/__init__.py select_kernels, chosen once at start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.adapters import LoRAGroup
from loraserve.kernels import Kernels

from . import adapter_extras
from .layers import Attention, AttentionShape, ForwardBatch, GatedMLP, LoRAProjection, RMSNorm
from .rope import rotary_tables


@dataclass(frozen=True)
class Arch:
    """What a family changes in the shared decoder; per-layer tuples have one entry a layer."""
    windows: tuple[int | None, ...]          # sliding window of each layer (None: full attention)
    rope_keys: tuple[str | None, ...]        # which rotary table each layer uses (a layer type)
    act: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    unit_offset_norm: bool = False           # Gemma's (1 + w) RMSNorm
    sandwich_norms: bool = False             # Gemma: norms after attention and after the MLP too
    embed_scale: bool = False                # Gemma: embeddings times sqrt(hidden)
    attn_scale: float | None = None          # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None


def layer_types(config) -> list[str]:
    """HF's per-layer attention types, or full attention everywhere."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers


def typed_windows(config) -> tuple[int | None, ...]:
    """The window of every `sliding_attention` layer (Qwen2/3, Gemma 2/3: HF's layer_types)."""
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in layer_types(config))


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderLayer(nn.Module):
    def __init__(self, config, arch: Arch, index: int, kernels: Kernels):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        shape = AttentionShape(
            hidden=h, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim_of(config), bias=arch.qkv_bias, qk_norm=arch.qk_norm,
            unit_offset_norm=arch.unit_offset_norm, eps=eps, scale=arch.attn_scale,
            window=arch.windows[index], softcap=arch.attn_softcap)
        self.attn = Attention(shape, kernels)
        self.mlp = GatedMLP(h, config.intermediate_size, arch.act, kernels)
        def norm() -> RMSNorm:
            return RMSNorm(h, eps, arch.unit_offset_norm, kernels)

        self.input_norm, self.pre_mlp_norm = norm(), norm()
        self.post_attn_norm = norm() if arch.sandwich_norms else None
        self.post_mlp_norm = norm() if arch.sandwich_norms else None
        self.rope_key = arch.rope_keys[index]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.attn(self.input_norm(x), cos, sin, batch)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x), batch)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class DecoderForCausalLM(nn.Module):
    """The shared model. Subclasses set `model_types` and implement `arch`."""
    model_types: tuple[str, ...] = ()

    @classmethod
    def arch(cls, config) -> Arch:
        raise NotImplementedError

    def __init__(self, config, max_position: int, kernels: Kernels):
        super().__init__()
        self.config, self.kernels, self.max_position = config, kernels, max_position
        self.spec = self.arch(config)
        self.head_dim = head_dim_of(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.spec, i, kernels)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.spec.unit_offset_norm, kernels)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head = None        # the logits matmul's format, when base_weights.pack_output_head gives it one
        self.rope: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def init_rotary(self, dtype: torch.dtype) -> None:
        """One table per distinct rope key (Gemma 3: local and global bases), all positions."""
        device = self.embed.weight.device
        for key in set(self.spec.rope_keys):
            self.rope[key] = rotary_tables(self.config, self.head_dim, self.max_position, dtype, device, key)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = adapter_extras.embed_tokens(self.embed, input_ids, batch.extras)   # [T, hidden], with adapters' parts
        if self.spec.embed_scale:                                        # in the activation dtype, as HF
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        tables = {key: (cos[batch.positions], sin[batch.positions]) for key, (cos, sin) in self.rope.items()}
        for layer in self.layers:
            x = layer(x, *tables[layer.rope_key], batch)
        return self.norm(x)

    def output_weight(self) -> torch.Tensor:
        """The output embedding [vocab, hidden] as a plain matrix, whatever its format."""
        if self.head is not None and not self.tie:
            return self.head.dense()
        return (self.embed if self.tie else self.lm_head).weight.detach()

    def compute_logits(self, hidden: torch.Tensor, extras: adapter_extras.StepExtras | None = None) -> torch.Tensor:
        logits = self.head(hidden) if self.head is not None else F.linear(hidden, self.output_weight())
        logits = adapter_extras.compute_logits(hidden, logits, self.tie, extras)   # adapters' lm_head parts
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # -- weights ---------------------------------------------------------------------
    def layer_sources(self, i: int) -> dict[str, list[str]]:
        """This model's parameter (within layer i) -> the HF tensors concatenated into it.
        The Llama names; families with other names override."""
        pre, attn = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out = {
            "attn.qkv.weight": [attn + f"{m}_proj.weight" for m in "qkv"],
            "attn.o.weight": [attn + "o_proj.weight"],
            "mlp.gate_up.weight": [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"],
            "mlp.down.weight": [pre + "mlp.down_proj.weight"],
            "input_norm.weight": [pre + "input_layernorm.weight"],
            "pre_mlp_norm.weight": [pre + "post_attention_layernorm.weight"],
        }
        if self.spec.qkv_bias:
            out["attn.qkv.bias"] = [attn + f"{m}_proj.bias" for m in "qkv"]
        if self.spec.qk_norm:
            out |= {"attn.q_norm.weight": [attn + "q_norm.weight"], "attn.k_norm.weight": [attn + "k_norm.weight"]}
        return out

    def load_hf_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy HF tensors onto this layout (q,k,v -> qkv; gate,up -> gate_up); every
        parameter must be filled and every checkpoint tensor used."""
        get = state.pop
        with torch.no_grad():
            self.embed.weight.copy_(get("model.embed_tokens.weight"))
            self.norm.weight.copy_(get("model.norm.weight"))
            if self.lm_head is not None:
                self.lm_head.weight.copy_(get("lm_head.weight"))
            for i, layer in enumerate(self.layers):
                sources = self.layer_sources(i)
                missing = {n for n, _ in layer.named_parameters()} - sources.keys()
                assert not missing, f"layer {i}: no checkpoint source for {sorted(missing)}"
                for name, keys in sources.items():
                    layer.get_parameter(name).copy_(torch.cat([get(k) for k in keys]))
        state.pop("lm_head.weight", None)          # tied checkpoints may carry a copy
        unused = [k for k in state if "rotary_emb" not in k]
        if unused:
            raise ValueError(f"checkpoint has weights this model does not use: {unused[:5]}")

    def attach_lora(self, layers: list[dict[str, LoRAGroup]]) -> None:
        """Read LoRA weights from the slot pool's buffers (one dict of groups per layer, in
        the fused layout: qkv, o, gate_up, down)."""
        assert len(layers) == len(self.layers), (len(layers), len(self.layers))
        for layer, groups in zip(self.layers, layers):
            for proj in layer.modules():
                if isinstance(proj, LoRAProjection):
                    proj.lora = groups.get(proj.name)

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        shape = (num_blocks, block_size, self.config.num_key_value_heads, self.head_dim)
        for layer in self.layers:
            layer.attn.k_cache = self.kernels.allocate_kv_cache(*shape, dtype, device)
            layer.attn.v_cache = self.kernels.allocate_kv_cache(*shape, dtype, device)
