import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from loraserve.adapters import LORA_MODULES, AdapterConflict, AdapterError, AdapterNotFound, AdapterRejected, BaseModelSpec


def test_module_shapes(spec):
    # hidden 64, inter 128, 4 heads x 16, 2 kv heads x 16
    assert spec.module_shape("q_proj") == (64, 64)
    assert spec.module_shape("k_proj") == (64, 32)
    assert spec.module_shape("v_proj") == (64, 32)
    assert spec.module_shape("o_proj") == (64, 64)
    assert spec.module_shape("gate_proj") == (64, 128)
    assert spec.module_shape("up_proj") == (64, 128)
    assert spec.module_shape("down_proj") == (128, 64)
    with pytest.raises(KeyError, match="lm_head"):
        spec.module_shape("lm_head")


def test_head_dim_differs_from_hidden_over_heads():
    spec = BaseModelSpec("qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    assert spec.module_shape("q_proj") == (64, 128)
    assert spec.module_shape("o_proj") == (128, 64)
    assert spec.module_shape("k_proj") == (64, 32)


@pytest.mark.parametrize("config_cls", [LlamaConfig, MistralConfig, Qwen2Config])
def test_from_hf_config(config_cls):
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)
    spec = BaseModelSpec.from_hf_config(config, max_lora_rank=16, base_model_id="org/tiny")
    assert (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers) == (64, 128, 3)
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim) == (4, 2, 16)
    assert spec.model_type == config.model_type
    assert (spec.max_lora_rank, spec.base_model_id) == (16, "org/tiny")


def test_from_hf_config_explicit_head_dim():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=48)
    assert BaseModelSpec.from_hf_config(config).head_dim == 48


def test_spec_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        BaseModelSpec("llama", 0, 128, 2, 4, 2, 16)


def test_lora_modules_are_the_seven_projections():
    assert LORA_MODULES == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_error_classes_map_to_http_codes():
    assert issubclass(AdapterRejected, AdapterError) and issubclass(AdapterRejected, ValueError)
    assert issubclass(AdapterNotFound, AdapterError) and issubclass(AdapterNotFound, KeyError)
    assert issubclass(AdapterConflict, AdapterError)
    # KeyError would print "'adapter x not found'" with quotes; the user sees the plain message.
    assert str(AdapterNotFound("adapter x not found")) == "adapter x not found"
