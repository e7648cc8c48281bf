"""Read and validate PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

The layout is exactly what `PeftModel.save_pretrained` writes:
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`  # [r, in_features]
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight`  # [out_features, r]
Everything is checked before a caller may store or serve the adapter; a failure is an
AdapterRejected whose message names the problem and the fix.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

from .base_spec import ADAPTER_MODULES, ATTENTION_MODULES, LORA_MODULES, BaseModelSpec
from .durable import fsync_dir, write_durably
from .errors import AdapterRejected
from .fused_layouts import split_fused
from .peft_config import VOCAB_MODULES, LoraHyper, check_config, check_targets_cover, parse_config_json
from .peft_vocab import LAYER_MAGNITUDE, VocabWeights, collect_vocab, split_vocab_keys

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# What save_pretrained writes for a CausalLM (first prefix) or a bare decoder (others).
_KEY = re.compile(r"^(?P<prefix>(?:base_model\.model\.)?(?:model\.)?)layers\.(?P<layer>\d+)\."
                  r"(?P<group>self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<ab>[AB])\.weight$")
_ANY_LORA = re.compile(r"(?:^|\.)(?P<module>[A-Za-z0-9_]+)\.lora_[AB]\.weight$")


@dataclass
class LoRAAdapter:
    """One adapter's weights in PEFT's own layout, validated against a base model."""

    rank: int
    alpha: float
    use_rslora: bool
    scaling: float  # alpha/r, or alpha/sqrt(r) with use_rslora: exactly PEFT's
    target_modules: tuple[str, ...]  # subset of LORA_MODULES actually present, in LORA_MODULES order
    lora_a: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [rank, in_features], fp32, CPU
    lora_b: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features, rank], fp32, CPU
    config: dict  # the parsed adapter_config.json
    sha256: str  # of the adapter_model.safetensors bytes
    use_dora: bool = False
    magnitude: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # DoRA: (layer, module) -> [out]
    vocab: VocabWeights = field(default_factory=VocabWeights)  # embed_tokens / lm_head parts

    @property
    def num_bytes(self) -> int:
        """Bytes of the loaded fp32 tensors: what a CPU cache of adapters spends on this one."""
        tensors = [*self.lora_a.values(), *self.lora_b.values(), *self.magnitude.values(), *self.vocab.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kinds(self) -> tuple[str, ...]:
        """What the adapter does, for its info: "LoRA" or "rsLoRA" or "DoRA", then the vocab parts."""
        base = "DoRA" if self.use_dora else "rsLoRA" if self.use_rslora else "LoRA"
        return (base, *self.vocab.kinds)

    @property
    def has_extras(self) -> bool:
        """Anything beyond the projections' LoRA: the step then takes the extras path."""
        return self.use_dora or not self.vocab.is_empty


def load_peft_dir(path: str | os.PathLike, spec: BaseModelSpec, max_bytes: int | None = None) -> LoRAAdapter:
    """Load and validate the PEFT adapter saved in directory `path`."""
    config_json, safetensors_bytes = read_peft_dir(path, max_bytes)
    return load_peft_bytes(config_json, safetensors_bytes, spec, max_bytes)


def read_peft_dir(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[bytes, bytes]:
    """The raw bytes of a PEFT directory's two files; sizes are checked before reading."""
    config_path, weights_path = _peft_paths(path)
    if max_bytes is not None:
        _check_size(os.path.getsize(config_path) + os.path.getsize(weights_path), max_bytes)
    with open(config_path, "rb") as f:
        config_json = f.read()
    with open(weights_path, "rb") as f:
        safetensors_bytes = f.read()
    return config_json, safetensors_bytes


def load_peft_bytes(config_json: bytes, safetensors_bytes: bytes, spec: BaseModelSpec,
                    max_bytes: int | None = None, sha256: str | None = None,
                    check_values: bool = True) -> LoRAAdapter:
    """Load and validate an adapter from the bytes of its two files (an HTTP upload).
    The store passes the hash it already verified and skips the scan for NaN/inf of
    bytes that were scanned at registration (a cold load pays neither twice)."""
    if max_bytes is not None:
        _check_size(len(config_json) + len(safetensors_bytes), max_bytes)
    config = parse_config_json(config_json)
    hyper = check_config(config, spec)
    tensors = _read_safetensors(safetensors_bytes)
    found, tensors = split_vocab_keys(tensors)
    vocab = collect_vocab(found, hyper, spec)
    magnitude = _collect_magnitudes(tensors, hyper, spec)
    lora_a, lora_b = _collect_weights(tensors, hyper, spec, check_values, vocab)
    if hyper.use_dora and lora_a.keys() != magnitude.keys():
        layer, module = sorted(lora_a.keys() ^ magnitude.keys())[0]
        raise AdapterRejected(f"use_dora is set but layer {layer} {module} lacks its lora_magnitude_vector "
                              "(or has one without LoRA weights); re-save the adapter with PEFT")
    lora_a, lora_b, magnitude = split_fused(lora_a, lora_b, spec, magnitude)   # Phi-3's qkv_proj -> q/k/v_proj
    present = tuple(m for m in LORA_MODULES if any(module == m for _, module in lora_a))
    present += tuple(m for m, a in zip(VOCAB_MODULES, (vocab.embed_a, vocab.head_a)) if a is not None)
    return LoRAAdapter(
        rank=hyper.rank, alpha=hyper.alpha, use_rslora=hyper.use_rslora, scaling=hyper.scaling,
        target_modules=present, lora_a=lora_a, lora_b=lora_b, config=config,
        sha256=sha256 or hashlib.sha256(safetensors_bytes).hexdigest(),
        use_dora=hyper.use_dora, magnitude=magnitude, vocab=vocab,
    )


def _collect_magnitudes(tensors: dict[str, torch.Tensor], hyper: LoraHyper, spec: BaseModelSpec) -> dict:
    """DoRA's magnitude vectors of the projections (popped from `tensors`): [out_features] each."""
    magnitude = {}
    for key in sorted(k for k in tensors if LAYER_MAGNITUDE.match(k)):
        match = LAYER_MAGNITUDE.match(key)
        layer, module = int(match["layer"]), match["module"]
        if not hyper.use_dora:
            raise AdapterRejected(f"tensor {key} is a DoRA magnitude vector but use_dora is not set; "
                                  "re-save the adapter with PEFT")
        if module not in spec.adapter_modules or layer >= spec.num_hidden_layers:
            raise AdapterRejected(f"unknown tensor {key}; this adapter was trained on a different base model")
        tensor = tensors.pop(key)
        out_features = spec.module_shape(module)[1]
        if tuple(tensor.shape) != (out_features,):
            raise AdapterRejected(f"tensor {key} has shape {list(tensor.shape)}, expected [{out_features}]")
        magnitude[layer, module] = tensor.to(dtype=torch.float32, device="cpu")
    return magnitude


def write_peft_files(dst_dir: str | os.PathLike, config_json: bytes, safetensors_bytes: bytes) -> None:
    """Write the two PEFT files into a new or empty `dst_dir`, fsynced, ready to be renamed into place."""
    os.makedirs(dst_dir, exist_ok=True)
    write_durably(os.path.join(dst_dir, CONFIG_NAME), config_json)
    write_durably(os.path.join(dst_dir, WEIGHTS_NAME), safetensors_bytes)
    fsync_dir(dst_dir)


def _peft_paths(path: str | os.PathLike) -> tuple[str, str]:
    if not os.path.isdir(path):
        raise AdapterRejected(f"adapter directory {str(path)!r} does not exist; "
                              "pass a directory written by PeftModel.save_pretrained")
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise AdapterRejected(f"{str(path)!r} has no {CONFIG_NAME}; "
                              "pass a directory written by PeftModel.save_pretrained")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise AdapterRejected(f"{str(path)!r} holds only a pickled {PICKLE_NAME}, which is refused because "
                                  "unpickling can execute code; re-save with safe_serialization=True "
                                  f"(the save_pretrained default) to get {WEIGHTS_NAME}")
        raise AdapterRejected(f"{str(path)!r} has no {WEIGHTS_NAME}; "
                              "re-save the adapter with PeftModel.save_pretrained")
    return config_path, weights_path


def _check_size(num_bytes: int, max_bytes: int) -> None:
    if num_bytes > max_bytes:
        raise AdapterRejected(f"adapter is {num_bytes} bytes, over the limit of {max_bytes} bytes; "
                              "use a lower rank or fewer target modules, or raise the server's adapter size limit")


def _read_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except Exception as e:  # safetensors raises its own error type, or others on odd headers
        raise AdapterRejected(f"{WEIGHTS_NAME} is not a valid safetensors file ({e}); "
                              "the upload may be truncated or corrupt: re-save and upload it again") from None


def _collect_weights(tensors: dict[str, torch.Tensor], hyper: LoraHyper, spec: BaseModelSpec,
                     check_values: bool = True, vocab: VocabWeights | None = None):
    """Map keys to (layer, module) and check each tensor; return (lora_a, lora_b)."""
    lora_a, lora_b = {}, {}
    module_paths = {}  # "model.layers.0.self_attn.q_proj" -> first tensor key, for target checks
    _check_lora_modules(tensors)
    for key in sorted(tensors):
        layer, module, ab = _parse_key(key, spec)
        side = lora_a if ab == "A" else lora_b
        if (layer, module) in side:
            raise AdapterRejected(f"tensor {key} duplicates lora_{ab} of layer {layer} {module}; "
                                  "re-save the adapter with PEFT")
        side[(layer, module)] = _check_tensor(key, tensors[key], ab, module, hyper.rank, spec, check_values)
        group = "self_attn" if module in ATTENTION_MODULES else "mlp"
        module_paths.setdefault(f"model.layers.{layer}.{group}.{module}", key)
    _check_pairs(lora_a, lora_b)
    if not lora_a and (vocab is None or vocab.is_empty):
        raise AdapterRejected(f"{WEIGHTS_NAME} holds no LoRA weights; re-save the adapter with PEFT")
    if vocab is not None:
        if vocab.embed_a is not None:
            module_paths["model.embed_tokens"] = "embed_tokens.lora_embedding_A"
        if vocab.head_a is not None:
            module_paths["lm_head"] = "lm_head.lora_A.weight"
    check_targets_cover(hyper.target_modules, module_paths)
    return lora_a, lora_b


def _check_lora_modules(tensors: dict[str, torch.Tensor]) -> None:
    """Name LoRA on an unsupported module (lm_head, embed_tokens) before any other odd key."""
    for key in sorted(tensors):
        other = _ANY_LORA.search(key)
        if other is not None and other["module"] not in ADAPTER_MODULES:
            raise AdapterRejected(f"LoRA on module {other['module']!r} (tensor {key}) is not supported; "
                                  f"loraserve applies LoRA to {', '.join(LORA_MODULES)} only: retrain without it")


def _parse_key(key: str, spec: BaseModelSpec) -> tuple[int, str, str]:
    match = _KEY.match(key)
    if match is None or match["module"] not in ADAPTER_MODULES:
        if ".base_layer." in key:  # PEFT's save_embedding_layers writes whole base matrices
            raise AdapterRejected(f"tensor {key} is a full copy of a base weight, which loraserve does not serve; "
                                  "re-save with save_embedding_layers=False and without modules_to_save")
        raise AdapterRejected(f"unknown tensor {key} in {WEIGHTS_NAME}; expected PEFT LoRA keys like "
                              "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    module, layer = match["module"], int(match["layer"])
    expected_group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    if match["group"] != expected_group:
        raise AdapterRejected(f"unknown tensor {key}: {module} belongs under {expected_group}, not {match['group']}")
    if layer >= spec.num_hidden_layers:
        raise AdapterRejected(f"tensor {key} is for layer {layer} but the base model has "
                              f"{spec.num_hidden_layers} layers; this adapter was trained on a different base model")
    return layer, module, match["ab"]


def _check_tensor(key: str, tensor: torch.Tensor, ab: str, module: str, rank: int,
                  spec: BaseModelSpec, check_values: bool = True) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise AdapterRejected(f"tensor {key} has dtype {tensor.dtype}; LoRA weights must be floating point")
    in_features, out_features = spec.module_shape(module)
    # lora_A: [r, in_features]; lora_B: [out_features, r]
    expected = (rank, in_features) if ab == "A" else (out_features, rank)
    rank_dim = 0 if ab == "A" else 1
    if tensor.dim() == 2 and tensor.shape[rank_dim] != rank and tensor.shape[1 - rank_dim] == expected[1 - rank_dim]:
        raise AdapterRejected(f"tensor {key} has rank {tensor.shape[rank_dim]} but adapter_config.json says "
                              f"r={rank}; config and weights disagree: re-save the adapter with PEFT")
    if tuple(tensor.shape) != expected:
        raise AdapterRejected(f"tensor {key} has shape {list(tensor.shape)}, expected {list(expected)} for "
                              f"{module} of the served base ({spec.model_type}, hidden_size {spec.hidden_size}); "
                              "this adapter was trained on a different base model")
    tensor = tensor.to(dtype=torch.float32, device="cpu")
    if check_values and not torch.isfinite(tensor).all():
        raise AdapterRejected(f"tensor {key} contains NaN or inf values; the training diverged: "
                              "retrain (e.g. with a lower learning rate) or use an earlier checkpoint")
    return tensor


def _check_pairs(lora_a: dict, lora_b: dict) -> None:
    for (layer, module) in lora_a.keys() ^ lora_b.keys():
        have, lack = ("lora_A", "lora_B") if (layer, module) in lora_a else ("lora_B", "lora_A")
        raise AdapterRejected(f"layer {layer} {module} has {have} but no {lack}; "
                              "the file is incomplete: re-save the adapter with PEFT")
