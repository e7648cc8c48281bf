"""Where a model comes from: a local HF directory, a .gguf file, or a hub id (a local
directory stands in for the hub: tests never download)."""

from __future__ import annotations

import shutil

import pytest

from loraserve import LLM, SamplingParams
from loraserve.model import loader

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def test_hub_id_goes_through_snapshot_download(tiny_models, monkeypatch, tmp_path):
    base_dir, _ = tiny_models["llama"]
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        target = tmp_path / "hub-copy"
        shutil.copytree(base_dir, target, dirs_exist_ok=True)
        return str(target)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    llm = LLM(model="some-org/tiny-llama", dtype="float32", cache_dir=str(tmp_path / "cache"))
    assert calls and calls[0][0] == "some-org/tiny-llama"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert llm.engine.model_id == "some-org/tiny-llama"
    local = LLM(model=base_dir, dtype="float32")
    prompt = ["hub or local"]
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids == \
        local.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids


def test_sharded_safetensors_directory(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM
    base_dir, _ = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{base_dir}/{f}", sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompt = ["sharded weights"]
    a = LLM(model=str(sharded), dtype="float32").generate(prompt, GREEDY, use_tqdm=False)[0]
    b = LLM(model=base_dir, dtype="float32").generate(prompt, GREEDY, use_tqdm=False)[0]
    assert a.token_ids == b.token_ids


def test_gguf_file_is_converted_once(tmp_path):
    gguf = loader.embedded_gguf_path()
    first = loader.resolve_model(gguf, cache_dir=str(tmp_path))
    second = loader.resolve_model(gguf, cache_dir=str(tmp_path))
    assert first.local_dir == second.local_dir and first.local_dir.startswith(str(tmp_path))


@pytest.mark.parametrize("bad, message", [
    ("/no/such/dir", "neither"),
    ("./relative/missing", "neither"),
])
def test_bad_model_paths_say_what_is_wrong(bad, message):
    with pytest.raises(FileNotFoundError, match=message):
        loader.resolve_model(bad)


def test_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        loader.resolve_model(str(tmp_path))
