"""Synthetic adapters and prompts for the benchmarks: PEFT files with random nonzero
weights, written in the exact layout `PeftModel.save_pretrained` produces."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import torch
from safetensors.torch import save_file

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def module_shapes(hf_config) -> dict[str, tuple[int, int]]:
    h, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


ADAPTER_KINDS = ("lora", "dora", "embed_head")


def write_adapter(out_dir: str, hf_config, base_id: str, rank: int, seed: int,
                  targets: list[str] = ALL_MODULES, alpha: int | None = None, kind: str = "lora") -> str:
    """One rank-`rank` adapter on `targets` of every layer; kind "dora" adds DoRA's
    magnitude vectors, "embed_head" adds LoRA on embed_tokens and lm_head."""
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(hf_config)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for m in targets:
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{m}"
            fan_in, fan_out = shapes[m]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
            if kind == "dora":
                tensors[f"{prefix}.lora_magnitude_vector"] = 1 + 0.1 * torch.rand(fan_out, generator=gen)
    if kind == "embed_head":
        vocab, hidden = hf_config.vocab_size, hf_config.hidden_size
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(rank, vocab, generator=gen)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(hidden, rank, generator=gen) * 0.01
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden ** 0.5
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(vocab, rank, generator=gen) * 0.01
        targets = list(targets) + ["embed_tokens", "lm_head"]
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "base_model_name_or_path": base_id, "fan_in_fan_out": False, "modules_to_save": None,
              "use_dora": kind == "dora"}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def random_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


# Shapes of public models, for benchmarks on random weights (no download needed).
MODEL_PRESETS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def write_random_model(out_dir: str, preset: str, tokenizer_dir: str) -> str:
    """A random-weight Llama of a preset's shape saved as an HF directory, with the
    tokenizer (and its vocabulary size) of `tokenizer_dir`: throughput depends on shapes only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = LlamaConfig(vocab_size=vocab, **MODEL_PRESETS[preset])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in glob.glob(os.path.join(tokenizer_dir, "*token*")) + glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(f, out_dir)
    return out_dir
