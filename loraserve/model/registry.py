"""model_type -> the family class that serves it: the one list of what loraserve runs."""

from __future__ import annotations

from .decoder import DecoderForCausalLM
from .gemma2 import Gemma2ForCausalLM
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM
from .phi3 import Phi3ForCausalLM
from .qwen3 import Qwen3ForCausalLM

FAMILIES = (LlamaForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM)
MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {t: cls for cls in FAMILIES for t in cls.model_types}
SUPPORTED_MODEL_TYPES = tuple(MODEL_CLASSES)


def model_class(hf_config) -> type[DecoderForCausalLM]:
    if hf_config.model_type not in MODEL_CLASSES:
        raise ValueError(f"model type {hf_config.model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return MODEL_CLASSES[hf_config.model_type]
