"""Gemma 3 (text): Gemma 2's layer plus (1 + w) q/k norms, no soft-capping by default,
and two rotary tables: local layers (`sliding_attention`, rope_local_base_freq) and
global ones, each layer picking its table by its HF layer type."""

from __future__ import annotations

from .decoder import Arch, DecoderForCausalLM, layer_types, typed_windows
from .gemma2 import gemma_norm_names, gemma_options


class Gemma3ForCausalLM(DecoderForCausalLM):
    model_types = ("gemma3_text",)

    @classmethod
    def arch(cls, config) -> Arch:
        return Arch(windows=typed_windows(config), rope_keys=tuple(layer_types(config)), qk_norm=True,
                    **gemma_options(config))

    def layer_sources(self, i: int) -> dict[str, list[str]]:
        return gemma_norm_names(super().layer_sources(i), i)
