"""The base model's projection shapes, which every adapter is validated against."""

from __future__ import annotations

from dataclasses import dataclass

# The LoRA-able projections of a Llama-family decoder layer, in forward order.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3's checkpoints fuse q,k,v and gate,up; adapters trained on it name the fused
# projections, which adapters/fused_layouts.py splits into LORA_MODULES at load time.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_MODEL_TYPES = ("phi3",)
ADAPTER_MODULES = LORA_MODULES + tuple(FUSED_MODULES)   # every name an adapter file may carry
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base model's projection shapes."""

    model_type: str  # "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_lora_rank: int = 64
    base_model_id: str = ""  # informative; used for a name mismatch warning only
    vocab_size: int = 0  # rows of embed_tokens and lm_head; 0 = unknown (adapters on them are refused)
    tie_word_embeddings: bool = False  # lm_head reads embed_tokens' weight
    max_module_copy_bytes: int = 1 << 30  # per adapter: full copies (modules_to_save) above this are refused

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_lora_rank")
        for field in sizes:
            if getattr(self, field) <= 0:
                raise ValueError(f"BaseModelSpec.{field} must be positive, got {getattr(self, field)}")

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection, as nn.Linear sees it."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
            "qkv_proj": (self.hidden_size, q_out + 2 * kv_out),
            "gate_up_proj": (self.hidden_size, 2 * self.intermediate_size),
        }
        if module not in shapes:
            raise KeyError(f"{module!r} is not a LoRA-able module; expected one of {ADAPTER_MODULES}")
        return shapes[module]

    @property
    def adapter_modules(self) -> tuple[str, ...]:
        """The module names a PEFT adapter of this architecture targets (its HF names)."""
        if self.model_type in FUSED_MODEL_TYPES:
            return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        return LORA_MODULES

    @property
    def shape_key(self) -> str:
        """The shapes adapters depend on, as a string: equal keys mean interchangeable bases."""
        return (f"{self.model_type}:h{self.hidden_size}:i{self.intermediate_size}:l{self.num_hidden_layers}"
                f":a{self.num_attention_heads}:kv{self.num_key_value_heads}:d{self.head_dim}")

    @classmethod
    def from_hf_config(cls, config, max_lora_rank: int = 64, base_model_id: str = "",
                       max_module_copy_bytes: int = 1 << 30) -> "BaseModelSpec":
        """Build from a transformers PretrainedConfig (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3)."""
        heads = config.num_attention_heads
        # Qwen2 has no head_dim attribute and Mistral may carry head_dim=None; Qwen3 and
        # Gemma set one independent of hidden_size / heads.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            max_lora_rank=max_lora_rank,
            base_model_id=base_model_id or getattr(config, "_name_or_path", "") or "",
            vocab_size=getattr(config, "vocab_size", 0) or 0,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_module_copy_bytes=max_module_copy_bytes,
        )
