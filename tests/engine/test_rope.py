"""rope.py's tables against HF's own rotary modules, for every rope type a supported
config may carry (positions inside the original context, where HF's dynamic and
longrope variants use their static frequencies), and Gemma 3's per-layer-type bases."""

from __future__ import annotations

import pytest
import torch

from loraserve.model.rope import rotary_tables

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def hf_tables(rope, config, n: int, **kwargs):
    cos, sin = rope(torch.empty(0), torch.arange(n)[None], **kwargs)
    return cos[0], sin[0]


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_llama_rope_types_match_hf(kind):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_theta": 10000.0, "rope_type": "default"} | (SCALINGS[kind] or {})
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                         rope_parameters=params)
    cos, sin = rotary_tables(config, 16, 64, torch.float32, "cpu")
    ref_cos, ref_sin = hf_tables(LlamaRotaryEmbedding(config), config, 64)
    torch.testing.assert_close(cos[:, 0], ref_cos)
    torch.testing.assert_close(sin[:, 0], ref_sin)


def test_phi3_longrope_and_partial_rotary_match_hf():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    half = 6                                   # partial rotary: 12 of 16 dims
    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                        original_max_position_embeddings=64, partial_rotary_factor=0.75,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                         "short_factor": [1.0 + i / 10 for i in range(half)],
                                         "long_factor": [2.0 + i for i in range(half)]})
    cos, sin = rotary_tables(config, 16, 64, torch.float32, "cpu")
    ref_cos, ref_sin = hf_tables(Phi3RotaryEmbedding(config), config, 64)
    assert cos.shape[-1] == 12
    torch.testing.assert_close(cos[:, 0], ref_cos)
    torch.testing.assert_close(sin[:, 0], ref_sin)


def test_gemma3_local_and_global_bases_match_hf():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                               "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 10000.0}})
    rope = Gemma3RotaryEmbedding(config)
    for layer_type in ("sliding_attention", "full_attention"):
        cos, sin = rotary_tables(config, 16, 40, torch.float32, "cpu", layer_type)
        ref_cos, ref_sin = hf_tables(rope, config, 40, layer_type=layer_type)
        torch.testing.assert_close(cos[:, 0], ref_cos)
        torch.testing.assert_close(sin[:, 0], ref_sin)
