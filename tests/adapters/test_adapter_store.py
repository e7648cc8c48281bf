"""The store's everyday behaviour: register, versions and aliases, resolve, list, delete, load."""

import os

import pytest
import torch

from loraserve.adapters import AdapterNotFound, AdapterRejected, AdapterStore, default_store_root


@pytest.fixture
def store(tmp_path, spec):
    return AdapterStore(tmp_path / "store", spec)


def test_register_and_resolve(store, adapter_files):
    record = store.register_bytes("acme", "support-bot", *adapter_files)
    assert (record.tenant, record.name, record.version, record.key) == ("acme", "support-bot", 1, "acme/support-bot@1")
    assert (record.rank, record.alpha, record.use_rslora, record.shared) == (4, 8.0, False, False)
    assert record.target_modules == ("q_proj", "v_proj")
    assert sorted(os.listdir(record.path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert store.resolve("acme", "support-bot") == record
    assert store.resolve("acme", "support-bot@1") == record
    assert store.resolve("acme", "acme/support-bot@1") == record


def test_register_dir(store, adapter_dir, adapter_files):
    assert store.register_dir("acme", "bot", adapter_dir).sha256 == store.register_bytes("acme", "b2", *adapter_files).sha256


def test_new_registration_moves_the_alias(store, adapter_files, other_files):
    v1 = store.register_bytes("acme", "bot", *adapter_files)
    v2 = store.register_bytes("acme", "bot", *other_files)
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("acme", "bot") == v2
    assert store.resolve("acme", "bot@1") == v1
    assert store.versions("acme", "bot") == [v1, v2]
    assert store.list("acme") == [v2]


def test_identical_uploads_share_a_blob(store, adapter_files, kit):
    a = store.register_bytes("acme", "a", *adapter_files)
    b = store.register_bytes("globex", "b", *adapter_files)
    assert a.path == b.path
    # The same weights with another alpha are another adapter: another blob.
    c = store.register_bytes("acme", "c", kit.edit_config(adapter_files[0], lora_alpha=32), adapter_files[1])
    assert c.sha256 == a.sha256 and c.path != a.path and c.alpha == 32.0
    assert len(os.listdir(os.path.join(store.root, "blobs"))) == 2


def test_load_returns_the_weights(store, adapter_files, spec):
    from loraserve.adapters import load_peft_bytes

    adapter = store.load(store.register_bytes("acme", "bot", *adapter_files))
    expected = load_peft_bytes(*adapter_files, spec)
    assert adapter.sha256 == expected.sha256 and adapter.scaling == expected.scaling
    assert all(torch.equal(adapter.lora_b[k], expected.lora_b[k]) for k in expected.lora_b)


def test_unknown_refs(store, adapter_files):
    store.register_bytes("acme", "bot", *adapter_files)
    for ref in ("nope", "bot@2", "globex/bot"):
        with pytest.raises(AdapterNotFound, match=f"adapter '{ref}' not found for tenant 'acme'"):
            store.resolve("acme", ref)
    with pytest.raises(AdapterNotFound):
        store.versions("acme", "nope")


def test_rejected_adapter_stores_nothing(store, adapter_files, kit):
    with pytest.raises(AdapterRejected, match="VeRA"):
        store.register_bytes("acme", "bot", kit.edit_config(adapter_files[0], peft_type="VERA"), adapter_files[1])
    assert store.list("acme") == []
    root = store.root
    assert [os.listdir(os.path.join(root, d)) for d in ("blobs", "tenants", "tmp")] == [[], [], []]


def test_size_limit(tmp_path, spec, adapter_files, adapter_dir):
    store = AdapterStore(tmp_path, spec, max_adapter_bytes=1024)
    with pytest.raises(AdapterRejected, match="over the limit of 1024 bytes"):
        store.register_bytes("acme", "bot", *adapter_files)
    with pytest.raises(AdapterRejected, match="over the limit of 1024 bytes"):
        store.register_dir("acme", "bot", adapter_dir)


@pytest.mark.parametrize("tenant,name", [("acme", "../evil"), ("acme", "bot@2"), ("acme", "a/b"),
                                         ("acme", "a:b"), ("../x", "bot"), ("", "bot")])
def test_names_are_validated_before_anything(store, adapter_files, tenant, name):
    with pytest.raises(AdapterRejected, match="invalid"):
        store.register_bytes(tenant, name, *adapter_files)
    assert os.listdir(os.path.join(store.root, "tenants")) == []


def test_delete_one_version(store, adapter_files, other_files):
    v1 = store.register_bytes("acme", "bot", *adapter_files)
    v2 = store.register_bytes("acme", "bot", *other_files)
    assert store.delete("acme", "bot@2") == [v2]
    assert store.resolve("acme", "bot") == v1
    assert not os.path.exists(v2.path)  # its blob had no other user
    # Versions are never reused: a cache keyed by "acme/bot@2" can never see other weights.
    assert store.register_bytes("acme", "bot", *adapter_files).version == 3


def test_delete_whole_name(store, adapter_files, other_files):
    records = [store.register_bytes("acme", "bot", *f) for f in (adapter_files, other_files)]
    assert store.delete("acme", "bot") == records
    with pytest.raises(AdapterNotFound):
        store.resolve("acme", "bot")
    assert store.list("acme") == []
    assert os.listdir(os.path.join(store.root, "blobs")) == []
    assert store.register_bytes("acme", "bot", *adapter_files).version == 3


def test_delete_keeps_shared_blob(store, adapter_files):
    a = store.register_bytes("acme", "a", *adapter_files)
    b = store.register_bytes("acme", "b", *adapter_files)
    store.delete("acme", "a")
    assert os.path.isdir(b.path) and a.path == b.path
    store.load(b)


def test_delete_unknown(store, adapter_files):
    store.register_bytes("acme", "bot", *adapter_files)
    for ref in ("nope", "bot@5", "globex/bot"):
        with pytest.raises(AdapterNotFound):
            store.delete("acme", ref)


def test_load_after_delete_is_not_found(store, adapter_files):
    record = store.register_bytes("acme", "bot", *adapter_files)
    store.delete("acme", "bot")
    with pytest.raises(AdapterNotFound, match="no longer stored"):
        store.load(record)


def test_default_root_honours_xdg(tmp_path, monkeypatch, spec):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_root() == str(tmp_path / "xdg" / "loraserve" / "adapters")
    store = AdapterStore(None, spec)
    assert store.root == default_store_root() and os.path.isdir(os.path.join(store.root, "blobs"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_root() == str(tmp_path / "home" / ".cache" / "loraserve" / "adapters")
