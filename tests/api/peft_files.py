"""Random PEFT LoRA adapters for any Llama-family base, written straight as the two PEFT
files (no model load): what an HTTP client uploads."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save as save_safetensors

from loraserve.adapters import BaseModelSpec


def peft_files(spec: BaseModelSpec, rank: int = 8, alpha: float = 16, seed: int = 0,
               targets: tuple[str, ...] = ("q_proj", "v_proj"), scale: float = 0.05) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes with key names as PEFT writes them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = spec.module_shape(module)
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * scale
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "base_model_name_or_path": spec.base_model_id}
    return json.dumps(config).encode(), save_safetensors(tensors)


def write_peft_dir(path: str, files: tuple[bytes, bytes]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "wb") as f:
        f.write(files[0])
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(files[1])
    return path


def read_dir(path: str) -> tuple[bytes, bytes]:
    """The two PEFT files of a directory, as bytes."""
    with open(os.path.join(path, "adapter_config.json"), "rb") as f, \
            open(os.path.join(path, "adapter_model.safetensors"), "rb") as g:
        return f.read(), g.read()


def upload(client, name: str, files: tuple[bytes, bytes], **fields):
    """POST /v1/adapters as multipart, the way curl -F or requests would."""
    return client.post("/v1/adapters", data={"name": name, **fields},
                       files={"adapter_config": ("adapter_config.json", files[0], "application/json"),
                              "adapter_model": ("adapter_model.safetensors", files[1], "application/octet-stream")})
