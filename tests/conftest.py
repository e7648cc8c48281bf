"""Session fixtures shared by every test folder."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, and transformers imports
# triton early: set it before anything else so CPU runs test the kernels interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lorakit import ADAPTER_MIX, save_peft_adapter, save_tiny_model  # noqa: E402
from loraserve.model.loader import resolve_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    """The embedded SmolLM2 converted to an HF directory (done once per machine)."""
    return resolve_model(None).local_dir


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> str:
    """SmolLM2's tokenizer files: all the tiny models take from it. On a machine without
    the embedded model (a lent GPU machine) LORASERVE_TEST_TOKENIZER_DIR names a copy."""
    return os.environ.get("LORASERVE_TEST_TOKENIZER_DIR") or request.getfixturevalue("smollm_dir")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict:
    """{model_type: (base_dir, {adapter name: peft dir})} for llama and qwen2."""
    from transformers import AutoModelForCausalLM

    out = {}
    for model_type in ("llama", "qwen2"):
        root = tmp_path_factory.mktemp(model_type)
        base_dir = save_tiny_model(model_type, str(root / "base"), tokenizer_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        adapters = {name: save_peft_adapter(base, str(root / name), r, a, rs, t, seed=i + 1)
                    for i, (name, r, a, rs, t) in enumerate(ADAPTER_MIX)}
        out[model_type] = (base_dir, adapters)
    return out
