"""Qwen3: per-head RMSNorm of q and k before rope, no q/k/v bias, a head_dim of its own
(not hidden / heads), HF's layer_types for its optional sliding window."""

from __future__ import annotations

from .decoder import Arch, DecoderForCausalLM, typed_windows


class Qwen3ForCausalLM(DecoderForCausalLM):
    model_types = ("qwen3",)

    @classmethod
    def arch(cls, config) -> Arch:
        n = config.num_hidden_layers
        windows = typed_windows(config) if getattr(config, "sliding_window", None) else (None,) * n
        return Arch(windows=windows, rope_keys=(None,) * n, act=config.hidden_act,
                    qkv_bias=bool(getattr(config, "attention_bias", False)), qk_norm=True)
