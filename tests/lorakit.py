"""Helpers shared by the engine, e2e, tier and api tests: tiny random base models in HF
layout, real PEFT adapters written by `save_pretrained`, and an HF+PEFT oracle.
(A module of its own, not conftest: several test folders have a conftest.py.)"""

from __future__ import annotations

import copy
import glob
import os
import shutil

import torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (name, rank, alpha, use_rslora, targets): the mix every fidelity test runs
ADAPTER_MIX = [
    ("r4", 4, 8, False, ALL_MODULES),
    ("r8", 8, 32, False, ALL_MODULES),
    ("r16_rslora", 16, 16, True, ALL_MODULES),
    ("r64_qv", 64, 128, False, ["q_proj", "v_proj"]),
]


def random_lora_slots(ranks: list[int], hidden: int, outs: list[int], gen: torch.Generator,
                      pad: float = 0.0, r_max: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Slot buffers A, Bs in the kernels' packed layout (kernels/sgmv.py), allocated for
    rank max(r_max, ranks), holding one random adapter per slot at ranks[slot]; every
    other element is `pad` (NaN makes a kernel that reads past an adapter's weights
    poison its output)."""
    from loraserve.kernels.sgmv import capacity_rank, slot_a

    r_cap, n_proj = capacity_rank(max(r_max, *ranks)), len(outs)
    A = torch.full((len(ranks), hidden, r_cap, n_proj), pad)
    Bs = [torch.full((len(ranks), r_cap, o), pad) for o in outs]
    for s, r in enumerate(ranks):
        slot_a(A, s, r).copy_(torch.randn(hidden, r * n_proj, generator=gen) / hidden ** 0.5)
        for B in Bs:
            B[s, :r] = torch.randn(r, B.shape[2], generator=gen) / r ** 0.5
    return A, Bs


def tiny_config(model_type: str, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if model_type == "qwen2":
        return Qwen2Config(**common, rope_theta=10000.0)
    return LlamaConfig(**common, rope_theta=10000.0, head_dim=16)


def tiny_arch_config(model_type: str, vocab_size: int):
    """Tiny configs of the other families, each exercising what sets it apart: Qwen3's own
    head_dim, Gemma's soft-caps (small, so they bite on random weights) and 8-token
    windows, Gemma 3's two rope bases, Mistral's window on every layer, Phi-3's fused
    projections."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-5)
    if model_type == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if model_type == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                               attn_logit_softcapping=3.0, final_logit_softcapping=8.0)
    if model_type == "gemma3_text":
        rope = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
        return tf.Gemma3TextConfig(**common, head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention", "full_attention"], rope_parameters=rope)
    if model_type == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=8, tie_word_embeddings=False)
    if model_type == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False)
    raise KeyError(model_type)


def save_tiny_model(model_type: str, out_dir: str, tokenizer_dir: str, seed: int = 0) -> str:
    """A random 2-layer model saved like any HF checkpoint, with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, 49152) if model_type in ("llama", "qwen2") else tiny_arch_config(model_type, 49152)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():                 # random biases so qwen2's q/k/v bias path matters
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif "norm" in name and model_type not in ("llama", "qwen2"):   # non-trivial norms (Gemma's are 0)
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in glob.glob(os.path.join(tokenizer_dir, "*token*")) + glob.glob(os.path.join(tokenizer_dir, "*.jinja")):
        shutil.copy(f, out_dir)
    return out_dir


def save_peft_adapter(base_model, out_dir: str, rank: int, alpha: int, use_rslora: bool,
                      targets: list[str], seed: int, use_dora: bool = False) -> str:
    """A PEFT adapter with random nonzero A and B (and, for DoRA, a magnitude 10% off the
    base's column norms), written by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets,
                        init_lora_weights=False, lora_dropout=0.0, use_dora=use_dora)
    model = get_peft_model(copy.deepcopy(base_model), config)
    with torch.no_grad():                 # keep deltas moderate so logits stay meaningful
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "lora_" in name:
                p.mul_(0.5 / max(1.0, p.abs().max().item()))
    model.save_pretrained(out_dir)
    return out_dir


class PeftOracle:
    """HF transformers + PEFT on the same weights: logits of a full sequence."""

    def __init__(self, base_dir: str, adapters: dict[str, str], dtype: torch.dtype = torch.float32):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
        self.model = None
        for name, path in adapters.items():
            if self.model is None:
                self.model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        self.model = (self.model or base).eval()

    @torch.no_grad()
    def logits(self, token_ids: list[int], adapter: str | None) -> torch.Tensor:
        ids = torch.tensor([token_ids])
        if adapter is None:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    return self.model(input_ids=ids).logits[0].float()
            return self.model(input_ids=ids).logits[0].float()
        self.model.set_adapter(adapter)
        return self.model(input_ids=ids).logits[0].float()


def run_and_record(llm, prompts, adapters, params):
    """Generate, keeping the engine's logits of every sampled position per request."""
    recorded: dict[str, list[torch.Tensor]] = {}

    def on_logits(seqs, logits):
        for seq, row in zip(seqs, logits):
            recorded.setdefault(seq.state.output.request_id, []).append(row.float().cpu().clone())

    llm.engine.hooks.on_logits = on_logits
    try:
        outs = llm.generate(prompts, params, adapters=adapters, use_tqdm=False)
    finally:
        llm.engine.hooks.on_logits = None
    return outs, [torch.stack(recorded[o.request_id]) for o in outs]


def save_peft_kind(base_model, out_dir: str, seed: int, **lora_config) -> str:
    """A PEFT adapter of any LoRA kind (use_dora, embed_tokens/lm_head targets,
    modules_to_save, trainable_token_indices), every trained part random and visibly
    different from its initial value, written by PEFT itself."""
    import warnings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **({"r": 4, "lora_alpha": 8} | lora_config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base_model), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:          # DoRA's m starts at ||W||: move it
                    p.mul_(1 + 0.3 * torch.randn_like(p))
                elif "lora_" in name:
                    p.mul_(0.5 / max(1.0, p.abs().max().item()))
                elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(out_dir)
    return out_dir


def leading_token_ids(base_dir: str, prompts: list[str], n: int = 3) -> list[int]:
    """The first n token ids of each prompt, sorted and unique: what a trainable-tokens
    adapter retrains so that the prompts use its rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return sorted({t for p in prompts for t in tokenizer(p)["input_ids"][:n]})


def adapter_kinds(model_type: str, token_ids: list[int]) -> dict[str, dict]:
    """One LoraConfig (for save_peft_kind) of every adapter kind loraserve serves, in the
    family's own module names (Phi-3: its fused qkv_proj, gate_up_proj); token_ids are
    the ids the trainable-tokens adapter retrains."""
    from loraserve.adapters.base_spec import LORA_MODULES
    from loraserve.adapters.fused_layouts import model_targets

    every, attn = model_targets(model_type, LORA_MODULES), model_targets(model_type, ("q_proj", "v_proj"))
    return {
        "plain": dict(target_modules=every),
        "dora": dict(use_dora=True, target_modules=every + ["lm_head"]),
        "embed_head": dict(target_modules=["embed_tokens", "lm_head"] + attn),
        "copies": dict(target_modules=attn[:1], modules_to_save=["embed_tokens", "lm_head"]),
        "tokens": dict(target_modules=attn[:1], trainable_token_indices=token_ids),
    }


class PeftOracles:
    """One HF+PEFT model per adapter, same interface as PeftOracle: PEFT cannot hold a
    lm_head LoRA and a lm_head copy (modules_to_save) at once."""

    def __init__(self, base_dir: str, adapters: dict[str, str]):
        self.by_name = {name: PeftOracle(base_dir, {name: path}) for name, path in adapters.items()}
        self.base = PeftOracle(base_dir, {})

    def logits(self, token_ids: list[int], adapter: str | None) -> torch.Tensor:
        return (self.base if adapter is None else self.by_name[adapter]).logits(token_ids, adapter)
