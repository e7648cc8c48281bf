"""Fixtures of the fine-tuning tests; helpers live in ftkit.py, the live server in ../livekit.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # no test may reach a network


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smollm_dir) -> str:
    """A random 2-layer llama with SmolLM2's tokenizer and chat template: trains in seconds."""
    from lorakit import save_tiny_model

    return save_tiny_model("llama", str(tmp_path_factory.mktemp("tiny") / "base"), smollm_dir)
