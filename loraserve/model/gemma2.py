"""Gemma 2: (1 + w) RMSNorm, sandwich norms around attention and the MLP, embeddings
scaled by sqrt(hidden), GELU-tanh MLP, attention and final logit soft-capping, the
query_pre_attn_scalar scale, a sliding window on HF's `sliding_attention` layers, tied
embeddings."""

from __future__ import annotations

from .decoder import Arch, DecoderForCausalLM, typed_windows


class Gemma2ForCausalLM(DecoderForCausalLM):
    model_types = ("gemma2",)

    @classmethod
    def arch(cls, config) -> Arch:
        return Arch(windows=typed_windows(config), rope_keys=(None,) * config.num_hidden_layers,
                    **gemma_options(config))

    def layer_sources(self, i: int) -> dict[str, list[str]]:
        return gemma_norm_names(super().layer_sources(i), i)


def gemma_options(config) -> dict:
    """What Gemma 2 and 3 share."""
    return dict(act=config.hidden_activation, qkv_bias=bool(getattr(config, "attention_bias", False)),
                unit_offset_norm=True, sandwich_norms=True, embed_scale=True,
                attn_scale=config.query_pre_attn_scalar ** -0.5,
                attn_softcap=getattr(config, "attn_logit_softcapping", None),
                final_softcap=getattr(config, "final_logit_softcapping", None))


def gemma_norm_names(sources: dict[str, list[str]], i: int) -> dict[str, list[str]]:
    """Gemma's post_attention_layernorm follows attention; pre_feedforward_layernorm is
    the norm Llama calls post_attention_layernorm."""
    pre = f"model.layers.{i}."
    return sources | {"post_attn_norm.weight": [pre + "post_attention_layernorm.weight"],
                      "pre_mlp_norm.weight": [pre + "pre_feedforward_layernorm.weight"],
                      "post_mlp_norm.weight": [pre + "post_feedforward_layernorm.weight"]}
