"""Tiny Llama fixtures: a BaseModelSpec and PEFT adapters written by real PEFT, no network.

Helpers reach tests through the `kit` fixture rather than `from conftest import ...`:
sibling test folders have their own conftest.py, and the module name would collide.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraserve.adapters import BaseModelSpec

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)

_base_models: dict[tuple, torch.nn.Module] = {}


def tiny_llama(**overrides):
    """A tiny random LlamaForCausalLM, built once per shape and copied for each adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**TINY, **overrides}
    key = tuple(sorted(shape.items()))
    if key not in _base_models:
        torch.manual_seed(0)
        _base_models[key] = LlamaForCausalLM(LlamaConfig(vocab_size=32, **shape))
    return copy.deepcopy(_base_models[key])


def save_peft_adapter(dst, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=False, seed=0,
                      base_shape=None, safe_serialization=True, **lora_kwargs):
    """Write a real PEFT adapter (random, non-zero B) to `dst` and return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(**(base_shape or {}))
    torch.manual_seed(seed)
    target_modules = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        init_lora_weights=False, **lora_kwargs)
    with warnings.catch_warnings():  # transformers' own deprecation noise inside save_pretrained
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(str(dst), safe_serialization=safe_serialization)
    return peft_model


def read_files(path) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes) of a PEFT directory."""
    path = Path(path)
    return (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()


def edit_config(config_json: bytes, **changes) -> bytes:
    config = json.loads(config_json)
    config.update(changes)
    return json.dumps(config).encode()


def edit_tensors(safetensors_bytes: bytes, edit) -> bytes:
    """Apply `edit(dict_of_tensors)` (in place) and re-serialize."""
    tensors = load_safetensors(safetensors_bytes)
    edit(tensors)
    return save_safetensors(tensors)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    return SimpleNamespace(save=save_peft_adapter, read=read_files, edit_config=edit_config,
                           edit_tensors=edit_tensors, tiny_llama=tiny_llama, TINY=TINY)


@pytest.fixture
def spec() -> BaseModelSpec:
    return BaseModelSpec(model_type="llama", max_lora_rank=64, vocab_size=32, **TINY)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory) -> Path:
    """One read-only adapter: r=4 on q_proj and v_proj."""
    path = tmp_path_factory.mktemp("adapter")
    save_peft_adapter(path)
    return path


@pytest.fixture(scope="session")
def adapter_files(adapter_dir) -> tuple[bytes, bytes]:
    return read_files(adapter_dir)


@pytest.fixture(scope="session")
def other_files(tmp_path_factory) -> tuple[bytes, bytes]:
    """A second, different adapter: r=8 on every module, rsLoRA."""
    path = tmp_path_factory.mktemp("other")
    save_peft_adapter(path, r=8, alpha=16, use_rslora=True, seed=1,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return read_files(path)
