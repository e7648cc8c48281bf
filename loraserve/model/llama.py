"""Llama, Mistral (sliding window on every layer), Qwen2 (q/k/v bias; HF's layer_types
for its optional window), SmolLM: the shared decoder as it is."""

from __future__ import annotations

from .decoder import Arch, DecoderForCausalLM, typed_windows


class LlamaForCausalLM(DecoderForCausalLM):
    model_types = ("llama", "mistral", "qwen2")

    @classmethod
    def arch(cls, config) -> Arch:
        n = config.num_hidden_layers
        if config.model_type == "mistral":      # HF Mistral: the window applies to every layer
            windows = (getattr(config, "sliding_window", None),) * n
        else:
            windows = typed_windows(config) if getattr(config, "sliding_window", None) else (None,) * n
        bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        return Arch(windows=windows, rope_keys=(None,) * n, act=config.hidden_act, qkv_bias=bias)
