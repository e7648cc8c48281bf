"""Sources: hf://org/repo[@rev] through huggingface_hub (a local directory stands in), local paths."""

import huggingface_hub
import pytest
from huggingface_hub.errors import HFValidationError

from loraserve.adapters import AdapterError, AdapterRejected, AdapterStore


@pytest.fixture
def store(tmp_path, spec):
    return AdapterStore(tmp_path / "store", spec)


@pytest.fixture
def fake_hub(monkeypatch, adapter_dir):
    """Replace snapshot_download with a local directory; record what was asked."""
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns))
        return str(adapter_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hf_source(store, fake_hub, adapter_files):
    record = store.register_source("acme", "bot", "hf://org/tiny-lora@v1.0")
    assert fake_hub == [dict(repo_id="org/tiny-lora", revision="v1.0",
                             allow_patterns=["adapter_config.json", "adapter_model.safetensors"])]
    assert store.load(record).sha256 == record.sha256
    store.register_source("acme", "bot", "hf://org/tiny-lora")
    assert fake_hub[-1]["revision"] is None


@pytest.mark.parametrize("source", ["hf://", "hf://org/repo/extra", "hf://org/repo@", "hf:///repo"])
def test_malformed_hf_source(store, fake_hub, source):
    with pytest.raises(AdapterRejected, match="malformed"):
        store.register_source("acme", "bot", source)
    assert fake_hub == []


def test_hub_errors(store, monkeypatch):
    def not_found(**kwargs):
        raise HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(AdapterRejected, match="not found on the Hugging Face Hub"):
        store.register_source("acme", "bot", "hf://org/nope")

    def offline(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AdapterError, match="could not download hf://org/repo.*no route to host") as info:
        store.register_source("acme", "bot", "hf://org/repo")
    assert not isinstance(info.value, AdapterRejected)  # the server's problem, not the request's


def test_hf_repo_with_only_a_pickle(store, monkeypatch, tmp_path):
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(tmp_path / "snap"))
    with pytest.raises(AdapterRejected, match="no adapter_model.safetensors.*pickle"):
        store.register_source("acme", "bot", "hf://org/old-style")


def test_local_sources(store, adapter_dir):
    assert store.register_source("acme", "a", str(adapter_dir)).version == 1
    assert store.register_source("acme", "a", f"file://{adapter_dir}").version == 2


def test_unsupported_scheme(store):
    with pytest.raises(AdapterRejected, match="unsupported scheme"):
        store.register_source("acme", "bot", "s3://bucket/adapter")


def test_names_checked_before_download(store, fake_hub):
    with pytest.raises(AdapterRejected, match="invalid"):
        store.register_source("acme", "bad/name", "hf://org/repo")
    assert fake_hub == []
