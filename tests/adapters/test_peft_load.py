"""Loading PEFT adapters: the tensors and scaling are exactly PEFT's."""

import hashlib
import json

import pytest
import torch

from loraserve.adapters import load_peft_bytes, load_peft_dir, write_peft_files

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft_layers(peft_model):
    """(layer, module) -> peft LoraLayer, from the live PeftModel."""
    layers = {}
    for i, block in enumerate(peft_model.base_model.model.model.layers):
        for group in (block.self_attn, block.mlp):
            for module_name in ALL:
                module = getattr(group, module_name, None)
                if module is not None and hasattr(module, "lora_A"):
                    layers[(i, module_name)] = module
    return layers


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r,alpha,targets", [(4, 8, ("q_proj", "v_proj")), (8, 5, ALL), (2, 32, ("down_proj",))])
def test_load_matches_peft(tmp_path, spec, kit, use_rslora, r, alpha, targets):
    peft_model = kit.save(tmp_path, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora)
    adapter = load_peft_dir(tmp_path, spec)
    layers = _peft_layers(peft_model)
    assert set(adapter.lora_a) == set(adapter.lora_b) == set(layers)
    for key, layer in layers.items():
        assert torch.equal(adapter.lora_a[key], layer.lora_A["default"].weight)  # [r, in]
        assert torch.equal(adapter.lora_b[key], layer.lora_B["default"].weight)  # [out, r]
        assert adapter.scaling == layer.scaling["default"]
    assert adapter.target_modules == tuple(m for m in ALL if m in targets)
    assert (adapter.rank, adapter.alpha, adapter.use_rslora) == (r, alpha, use_rslora)


def test_rslora_scaling_divides_by_sqrt_rank(tmp_path, spec, kit):
    kit.save(tmp_path, r=16, alpha=8, use_rslora=True)
    assert load_peft_dir(tmp_path, spec).scaling == 2.0  # 8 / sqrt(16), not 8 / 16


def test_delta_matches_peft_forward(tmp_path, spec, kit):
    # The definition the serving kernels implement: y = base(x) + x @ A.T @ B.T * scaling.
    peft_model = kit.save(tmp_path, r=4, alpha=12, targets=("o_proj",), use_rslora=True)
    adapter = load_peft_dir(tmp_path, spec)
    layer = _peft_layers(peft_model)[(1, "o_proj")]
    x = torch.randn(3, 64)  # [tokens, in]
    expected = layer(x) - layer.base_layer(x)
    delta = x @ adapter.lora_a[(1, "o_proj")].T @ adapter.lora_b[(1, "o_proj")].T * adapter.scaling
    torch.testing.assert_close(delta, expected)


def test_bytes_and_dir_agree(adapter_dir, adapter_files, spec):
    from_dir = load_peft_dir(adapter_dir, spec)
    from_bytes = load_peft_bytes(*adapter_files, spec)
    assert from_dir.sha256 == from_bytes.sha256 == hashlib.sha256(adapter_files[1]).hexdigest()
    assert from_dir.config == json.loads(adapter_files[0])
    for key in from_dir.lora_a:
        assert torch.equal(from_dir.lora_a[key], from_bytes.lora_a[key])


def test_num_bytes_counts_fp32_tensors(adapter_files, spec):
    adapter = load_peft_bytes(*adapter_files, spec)
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4) floats
    assert adapter.num_bytes == 4 * 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)


def test_half_precision_file_loads_as_fp32(adapter_files, spec, kit):
    def to_bf16(tensors):
        for key in tensors:
            tensors[key] = tensors[key].to(torch.bfloat16)

    adapter = load_peft_bytes(adapter_files[0], kit.edit_tensors(adapter_files[1], to_bf16), spec)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in adapter.lora_a.values())


def test_regex_target_modules(tmp_path, spec, kit):
    kit.save(tmp_path, targets=r".*\.(k_proj|up_proj)")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == r".*\.(k_proj|up_proj)"
    assert load_peft_dir(tmp_path, spec).target_modules == ("k_proj", "up_proj")


def test_all_linear_target_modules(tmp_path, spec, kit):
    kit.save(tmp_path, targets="all-linear")
    assert load_peft_dir(tmp_path, spec).target_modules == ALL


def test_bare_decoder_keys_load(adapter_files, spec, kit):
    # Some exporters drop PEFT's "base_model.model." prefix; the layout is otherwise the same.
    def strip_prefix(tensors):
        for key in list(tensors):
            tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)

    adapter = load_peft_bytes(adapter_files[0], kit.edit_tensors(adapter_files[1], strip_prefix), spec)
    assert adapter.target_modules == ("q_proj", "v_proj")


def test_base_name_mismatch_only_warns(adapter_files, spec, kit, caplog):
    from dataclasses import replace

    config = kit.edit_config(adapter_files[0], base_model_name_or_path="/models/other-llama")
    with caplog.at_level("WARNING"):
        load_peft_bytes(config, adapter_files[1], replace(spec, base_model_id="org/tiny-llama"))
    assert "/models/other-llama" in caplog.text and "org/tiny-llama" in caplog.text


def test_write_peft_files_round_trips(tmp_path, adapter_files, spec):
    write_peft_files(tmp_path / "copy", *adapter_files)
    assert load_peft_dir(tmp_path / "copy", spec).sha256 == hashlib.sha256(adapter_files[1]).hexdigest()
