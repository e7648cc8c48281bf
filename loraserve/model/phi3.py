"""Phi-3 / Phi-4: the Llama layer with q,k,v and gate,up already fused in the checkpoint
(qkv_proj, gate_up_proj), partial rotary and longrope through rope.py, and a window on
every layer when the config sets one (as HF's Phi3Attention)."""

from __future__ import annotations

from .decoder import Arch, DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    model_types = ("phi3",)

    @classmethod
    def arch(cls, config) -> Arch:
        n = config.num_hidden_layers
        return Arch(windows=(getattr(config, "sliding_window", None),) * n, rope_keys=(None,) * n,
                    act=config.hidden_act)

    def layer_sources(self, i: int) -> dict[str, list[str]]:
        pre = f"model.layers.{i}."
        return super().layer_sources(i) | {
            "attn.qkv.weight": [pre + "self_attn.qkv_proj.weight"],
            "mlp.gate_up.weight": [pre + "mlp.gate_up_proj.weight"],
        }
