"""Fixtures of the API tests; helpers live in ../livekit.py and peft_files.py (a conftest
module name is shared by every test folder, so nothing is imported from here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # no test may reach a network


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    """(base_dir, {adapter name: peft dir}) of the tiny random llama."""
    return tiny_models["llama"]
