"""Rotary position tables, computed the way HF computes them, for every rope type.

inv_freq and the attention factor come from transformers' own `ROPE_INIT_FUNCTIONS`
(llama3, linear, dynamic, yarn, longrope): the field's reference, not a rewrite. The
tables are precomputed once for all positions; cos and sin are fp32 math cast to the
activation dtype, as HF does. `dynamic` and `longrope` pick their frequencies for the
configured context (HF switches per forward once a sequence outgrows
original_max_position_embeddings; within it the two agree). The rotation that reads
them is the kernels' (kernels/cpu_rope.py: the CPU op beside its torch reference).
"""

from __future__ import annotations

import torch


def rope_params(config, layer_type: str | None = None) -> dict:
    """The rope parameters of a layer type (Gemma 3 keeps one dict per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return params


def inv_freq_and_scaling(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_params(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
        return inv_freq.float(), float(scaling)
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * factor)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


def rotary_tables(config, head_dim: int, max_position: int, dtype: torch.dtype, device,
                  layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position, 1, rotary_dim] (rotary_dim < head_dim with partial rotary)."""
    inv_freq, scaling = inv_freq_and_scaling(config, head_dim, layer_type)
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
    return cos[:, None].to(device), sin[:, None].to(device)

