"""Every refusal names the problem and what to do; one test per rule."""

import math

import pytest
import torch

from loraserve.adapters import AdapterRejected, load_peft_bytes, load_peft_dir

Q_A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def reject(config, weights, spec, *needles, max_bytes=None):
    with pytest.raises(AdapterRejected) as info:
        load_peft_bytes(config, weights, spec, max_bytes=max_bytes)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


# -- the directory ----------------------------------------------------------------------

def test_missing_dir(tmp_path, spec):
    with pytest.raises(AdapterRejected, match="does not exist.*save_pretrained"):
        load_peft_dir(tmp_path / "nope", spec)


def test_missing_config(tmp_path, spec, adapter_files):
    (tmp_path / "adapter_model.safetensors").write_bytes(adapter_files[1])
    with pytest.raises(AdapterRejected, match="no adapter_config.json"):
        load_peft_dir(tmp_path, spec)


def test_pickle_only_dir_is_refused(tmp_path, spec, kit):
    kit.save(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(AdapterRejected) as info:
        load_peft_dir(tmp_path, spec)
    message = str(info.value)
    assert "pickle" in message and "execute code" in message and "safe_serialization=True" in message


def test_missing_weights(tmp_path, spec, adapter_files):
    (tmp_path / "adapter_config.json").write_bytes(adapter_files[0])
    with pytest.raises(AdapterRejected, match="no adapter_model.safetensors"):
        load_peft_dir(tmp_path, spec)


def test_too_large_dir_is_refused_before_reading(adapter_dir, spec):
    with pytest.raises(AdapterRejected, match="over the limit of 1000 bytes"):
        load_peft_dir(adapter_dir, spec, max_bytes=1000)


# -- the config -------------------------------------------------------------------------

def test_malformed_json(adapter_files, spec):
    reject(b"{not json", adapter_files[1], spec, "not valid JSON", "save_pretrained")


def test_json_not_an_object(adapter_files, spec):
    reject(b"[1, 2]", adapter_files[1], spec, "JSON object")


def test_not_lora(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], peft_type="PREFIX_TUNING"), adapter_files[1], spec,
           "PREFIX_TUNING", "LoRA adapters only")


@pytest.mark.parametrize("field,value,needle", [
    ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": 16}, "alpha_pattern"),
    ("layers_to_transform", [0], "layers_to_transform"),
    ("layers_to_transform", 0, "layers_to_transform"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("lora_bias", True, "lora_bias"),
])
def test_unsupported_features_are_named(adapter_files, spec, kit, field, value, needle):
    message = reject(kit.edit_config(adapter_files[0], **{field: value}), adapter_files[1], spec, needle)
    assert "does not support" in message and ";" in message  # the problem, then what to do


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_other_than_none(adapter_files, spec, kit, bias):
    reject(kit.edit_config(adapter_files[0], bias=bias), adapter_files[1], spec, repr(bias), "bias='none'")


@pytest.mark.parametrize("module", ["score", "rotary_emb"])
def test_unsupported_target_module_is_named(adapter_files, spec, kit, module):
    config = kit.edit_config(adapter_files[0], target_modules=["q_proj", "v_proj", module])
    reject(config, adapter_files[1], spec, f"target module '{module}'", "q_proj")


def test_lora_weights_on_unsupported_module_are_named(adapter_files, spec, kit):
    key = "base_model.model.model.layers.0.input_layernorm.lora_A.weight"
    weights = kit.edit_tensors(adapter_files[1], lambda t: t.__setitem__(key, torch.zeros(4, 64)))
    reject(adapter_files[0], weights, spec, "module 'input_layernorm'", key)


def test_lm_head_lora_not_in_target_modules(tmp_path, spec, kit):
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        kit.save(tmp_path, targets=("q_proj", "lm_head"))
    config, weights = kit.read(tmp_path)
    reject(kit.edit_config(config, target_modules=["q_proj"]), weights, spec, "not covered by target_modules")


def test_other_full_base_weights_are_refused(adapter_files, spec, kit):
    key = "base_model.model.model.norm.base_layer.weight"
    weights = kit.edit_tensors(adapter_files[1], lambda t: t.__setitem__(key, torch.zeros(64)))
    reject(adapter_files[0], weights, spec, key, "full copy of a base weight", "save_embedding_layers=False")


@pytest.mark.parametrize("key", ["base_model.model.lm_head.base_layer.weight",
                                 "base_model.model.model.embed_tokens.base_layer.weight"])
def test_vocabulary_resizing_is_refused(adapter_files, spec, kit, key):
    weights = kit.edit_tensors(adapter_files[1], lambda t: t.__setitem__(key, torch.zeros(40, 64)))
    reject(adapter_files[0], weights, spec, "resizes the vocabulary", "40", "32", "resize_token_embeddings")


def test_vocabulary_resizing_by_modules_to_save_is_refused(tmp_path, spec, kit):
    kit.save(tmp_path, modules_to_save=["lm_head"])
    config, weights = kit.read(tmp_path)
    key = "base_model.model.lm_head.weight"
    weights = kit.edit_tensors(weights, lambda t: t.__setitem__(key, torch.zeros(48, 64)))
    reject(config, weights, spec, "resizes the vocabulary", "48")


@pytest.mark.parametrize("peft_type,name", [("VERA", "VeRA"), ("LOHA", "LoHa"), ("LOKR", "LoKr"), ("IA3", "IA3"),
                                            ("ADALORA", "AdaLoRA"), ("PROMPT_TUNING", "prompt tuning")])
def test_other_peft_types_are_named(adapter_files, spec, kit, peft_type, name):
    reject(kit.edit_config(adapter_files[0], peft_type=peft_type), adapter_files[1], spec,
           name, "not served", "merge_and_unload")


def test_dora_without_magnitudes(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], use_dora=True), adapter_files[1], spec, "lora_magnitude_vector")


def test_dora_on_embed_tokens_is_refused(adapter_files, spec, kit):
    config = kit.edit_config(adapter_files[0], use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])
    reject(config, adapter_files[1], spec, "DoRA on embed_tokens")


@pytest.mark.parametrize("field,value,needle", [
    ("modules_to_save", ["lm_head"], "modules_to_save and the weights disagree"),
    ("modules_to_save", ["score"], "modules_to_save names 'score'"),
    ("trainable_token_indices", {"lm_head": [1]}, "trainable tokens of embed_tokens only"),
    ("trainable_token_indices", [1, 99], "outside the served vocabulary"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices and the weights disagree"),
])
def test_vocab_kind_config_errors(adapter_files, spec, kit, field, value, needle):
    reject(kit.edit_config(adapter_files[0], **{field: value}), adapter_files[1], spec, needle)


def test_modules_to_save_over_the_copy_budget(tmp_path, spec, kit):
    import dataclasses

    kit.save(tmp_path, modules_to_save=["embed_tokens", "lm_head"])
    config, weights = kit.read(tmp_path)
    load_peft_bytes(config, weights, spec)                       # 2 x 32 x 64 fp32 = 16 KiB fits the default
    small = dataclasses.replace(spec, max_module_copy_bytes=10_000)
    reject(config, weights, small, "16384 bytes", "10000", "--max-module-copy-bytes")


def test_weights_not_covered_by_target_modules(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], target_modules=["q_proj"]), adapter_files[1], spec,
           "v_proj", "not covered by target_modules", "disagree")


def test_regex_target_modules_must_cover_weights(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], target_modules=r".*q_proj"), adapter_files[1], spec,
           "v_proj", "regex")


def test_bad_regex(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], target_modules="(q_proj"), adapter_files[1], spec, "does not compile")


def test_missing_target_modules(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], target_modules=None), adapter_files[1], spec, "no target_modules")


@pytest.mark.parametrize("r", [0, -4, "4", None])
def test_rank_not_positive_int(adapter_files, spec, kit, r):
    reject(kit.edit_config(adapter_files[0], r=r), adapter_files[1], spec, "not a positive integer")


def test_rank_over_max(tmp_path, spec, kit):
    from dataclasses import replace

    kit.save(tmp_path, r=8)
    config, weights = kit.read(tmp_path)
    message = reject(config, weights, replace(spec, max_lora_rank=4), "rank 8 exceeds max_lora_rank 4")
    assert message.endswith("restart with --max-lora-rank 8")


@pytest.mark.parametrize("alpha", [None, 0, -1.0, "8", math.inf])
def test_alpha_missing_or_nonpositive(adapter_files, spec, kit, alpha):
    config = kit.edit_config(adapter_files[0], lora_alpha=alpha)
    reject(config, adapter_files[1], spec, "lora_alpha", "positive number")


def test_alpha_absent(adapter_files, spec):
    import json

    config = json.loads(adapter_files[0])
    del config["lora_alpha"]
    reject(json.dumps(config).encode(), adapter_files[1], spec, "lora_alpha=None")


# -- the weights against the base -------------------------------------------------------

def test_different_hidden_size(tmp_path, spec, kit):
    kit.save(tmp_path, base_shape=dict(hidden_size=32, head_dim=8))
    message = reject(*kit.read(tmp_path), spec, "has shape [4, 32], expected [4, 64]", "different base model")
    assert "layers.0.self_attn.q_proj.lora_A.weight" in message


def test_different_kv_heads(tmp_path, spec, kit):
    kit.save(tmp_path, targets=("k_proj",), base_shape=dict(num_key_value_heads=4))
    reject(*kit.read(tmp_path), spec, "k_proj.lora_B.weight has shape [64, 4], expected [32, 4]")


def test_layer_beyond_base(tmp_path, spec, kit):
    kit.save(tmp_path, base_shape=dict(num_hidden_layers=3))
    reject(*kit.read(tmp_path), spec, "layer 2", "base model has 2 layers")


def test_rank_disagrees_with_config(adapter_files, spec, kit):
    reject(kit.edit_config(adapter_files[0], r=8), adapter_files[1], spec, "rank 4", "r=8", Q_A0)


def test_a_without_b(adapter_files, spec, kit):
    weights = kit.edit_tensors(adapter_files[1], lambda t: t.pop(Q_B0))
    reject(adapter_files[0], weights, spec, "layer 0 q_proj has lora_A but no lora_B", "incomplete")


def test_b_without_a(adapter_files, spec, kit):
    weights = kit.edit_tensors(adapter_files[1], lambda t: t.pop(Q_A0))
    reject(adapter_files[0], weights, spec, "has lora_B but no lora_A")


def test_unknown_tensor_key(adapter_files, spec, kit):
    weights = kit.edit_tensors(adapter_files[1], lambda t: t.__setitem__("something.else", torch.zeros(2)))
    reject(adapter_files[0], weights, spec, "unknown tensor something.else")


def test_no_lora_weights(adapter_files, spec):
    from safetensors.torch import save

    reject(adapter_files[0], save({}), spec, "holds no LoRA weights")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_name_the_tensor(adapter_files, spec, kit, bad):
    def poison(tensors):
        tensors[Q_B0][1, 2] = bad

    reject(adapter_files[0], kit.edit_tensors(adapter_files[1], poison), spec, Q_B0, "NaN or inf")


def test_integer_tensor(adapter_files, spec, kit):
    def to_int(tensors):
        tensors[Q_A0] = tensors[Q_A0].to(torch.int32)

    reject(adapter_files[0], kit.edit_tensors(adapter_files[1], to_int), spec, Q_A0, "floating point")


def test_over_max_bytes(adapter_files, spec):
    size = len(adapter_files[0]) + len(adapter_files[1])
    reject(*adapter_files, spec, f"adapter is {size} bytes, over the limit of {size - 1}", max_bytes=size - 1)
    load_peft_bytes(*adapter_files, spec, max_bytes=size)  # the limit itself is allowed


@pytest.mark.parametrize("cut", [10, 200, -7])
def test_corrupt_safetensors(adapter_files, spec, cut):
    reject(adapter_files[0], adapter_files[1][:cut], spec, "not a valid safetensors file", "upload it again")
