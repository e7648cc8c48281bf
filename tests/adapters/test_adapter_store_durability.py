"""A restart finds every acknowledged adapter; a crash at any step leaves the old state or the new."""

import logging
import os
from dataclasses import replace

import pytest

from loraserve.adapters import AdapterError, AdapterNotFound, AdapterStore
from loraserve.adapters.store import WRITE_STEPS


class SimulatedCrash(BaseException):
    """Not an Exception: the store's error clean-up must not run, as after a real crash."""


def crash_at(step):
    def fault(current):
        if current == step:
            raise SimulatedCrash(step)
    return fault


def blob_count(root):
    return len(os.listdir(os.path.join(root, "blobs")))


def test_restart_sees_everything(tmp_path, spec, adapter_files, other_files):
    store = AdapterStore(tmp_path, spec)
    records = [store.register_bytes("acme", "bot", *adapter_files),
               store.register_bytes("acme", "bot", *other_files, shared=True),
               store.register_bytes("globex", "other", *adapter_files)]
    store.delete("acme", "bot@1")
    reopened = AdapterStore(tmp_path, spec)
    assert reopened.versions("acme", "bot") == [records[1]]
    assert reopened.resolve("globex", "other") == records[2]
    assert reopened.resolve("globex", "bot") == records[1]
    assert reopened.load(records[1]).rank == 8
    # The high-water mark survives too: version 1 and 2 are never handed out again.
    assert reopened.register_bytes("acme", "bot", *adapter_files).version == 3


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_crash_at_each_step_leaves_old_or_new(tmp_path, spec, adapter_files, other_files, step):
    v1 = AdapterStore(tmp_path, spec).register_bytes("acme", "bot", *adapter_files)
    with pytest.raises(SimulatedCrash):
        AdapterStore(tmp_path, spec, fault=crash_at(step)).register_bytes("acme", "bot", *other_files)

    reopened = AdapterStore(tmp_path, spec)  # start-up after the "crash"
    versions = reopened.versions("acme", "bot")
    durable = WRITE_STEPS.index(step) >= WRITE_STEPS.index("meta_committed")
    assert [r.version for r in versions] == ([1, 2] if durable else [1])
    assert versions[0] == v1
    for record in versions:
        reopened.load(record)  # never a half adapter
    assert os.listdir(os.path.join(tmp_path, "tmp")) == []  # stray staging swept
    assert blob_count(tmp_path) == len(versions)  # an unreferenced blob is collected
    assert os.listdir(os.path.join(tmp_path, "quarantine")) == []  # nothing looked corrupt
    assert reopened.register_bytes("acme", "bot", *other_files).version == len(versions) + 1


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_error_at_each_step_keeps_live_store_consistent(tmp_path, spec, adapter_files, other_files, step):
    store = AdapterStore(tmp_path, spec)
    store.register_bytes("acme", "bot", *adapter_files)

    def fail(current):
        if current == step:
            raise OSError(28, "No space left on device")

    store._fault = fail
    with pytest.raises(OSError):
        store.register_bytes("acme", "bot", *other_files)
    store._fault = lambda current: None
    live = [r.version for r in store.versions("acme", "bot")]
    assert [r.version for r in AdapterStore(tmp_path, spec).versions("acme", "bot")] == live
    assert os.listdir(os.path.join(tmp_path, "tmp")) == []
    assert blob_count(tmp_path) == len(live)


def test_corrupted_blob_is_quarantined_on_startup(tmp_path, spec, adapter_files, other_files, caplog):
    store = AdapterStore(tmp_path, spec)
    bad = store.register_bytes("acme", "bad", *other_files)
    good = store.register_bytes("acme", "good", *adapter_files)
    weights = os.path.join(bad.path, "adapter_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-3] ^= 0xFF  # one corrupted byte inside a tensor
    open(weights, "wb").write(bytes(data))

    with caplog.at_level(logging.ERROR):
        reopened = AdapterStore(tmp_path, spec)
    assert "acme/bad@1" in caplog.text and "quarantined" in caplog.text
    with pytest.raises(AdapterNotFound):
        reopened.resolve("acme", "bad")
    assert reopened.resolve("acme", "good") == good
    reopened.load(good)
    assert len(os.listdir(os.path.join(tmp_path, "quarantine"))) == 2  # the blob and its metadata
    AdapterStore(tmp_path, spec).resolve("acme", "good")  # and the next start-up is clean


def test_corruption_found_at_load_is_quarantined(tmp_path, spec, adapter_files, other_files):
    store = AdapterStore(tmp_path, spec)
    bad = store.register_bytes("acme", "bad", *other_files)
    good = store.register_bytes("acme", "good", *adapter_files)
    with open(os.path.join(bad.path, "adapter_config.json"), "ab") as f:
        f.write(b" ")
    with pytest.raises(AdapterError, match="acme/bad@1 is corrupted on disk.*quarantined.*register it again"):
        store.load(bad)
    with pytest.raises(AdapterNotFound):
        store.resolve("acme", "bad")
    store.load(good)
    assert AdapterStore(tmp_path, spec).list("acme") == [good]


def test_garbage_does_not_break_startup(tmp_path, spec, adapter_files, caplog):
    store = AdapterStore(tmp_path, spec)
    good = store.register_bytes("acme", "good", *adapter_files)
    name_dir = os.path.join(tmp_path, "tenants", "acme", "good")
    open(os.path.join(name_dir, "7.json"), "w").write("{truncated")  # unreadable metadata
    open(os.path.join(name_dir, "notes.txt"), "w").write("hi")  # a stranger's file
    os.makedirs(os.path.join(tmp_path, "tenants", "acme", "empty"))  # a name with no version yet
    os.makedirs(os.path.join(tmp_path, "tenants", "..bad"))
    os.makedirs(os.path.join(tmp_path, "tmp", "half-written-blob"))
    open(os.path.join(tmp_path, "tmp", "x.json"), "w").write("{")
    open(os.path.join(tmp_path, "tenants", "acme", "good", "high_water"), "w").write("garbage")

    with caplog.at_level(logging.WARNING):
        reopened = AdapterStore(tmp_path, spec)
    assert reopened.list("acme") == [good]
    assert os.listdir(os.path.join(tmp_path, "tmp")) == []
    assert any("7.json" in name for name in os.listdir(os.path.join(tmp_path, "quarantine")))
    # The quarantined 7.json still counted: the next version is 8, never a reused number.
    assert reopened.register_bytes("acme", "good", *adapter_files).version == 8


def test_other_base_models_adapters_are_kept_but_hidden(tmp_path, spec, adapter_files, kit):
    llama = AdapterStore(tmp_path, spec)
    mine = llama.register_bytes("acme", "bot", *adapter_files)
    other_spec = replace(spec, hidden_size=32, head_dim=8)
    other = AdapterStore(tmp_path, other_spec)  # same default root, another base model
    assert other.list("acme") == []
    kit.save(tmp_path / "small", base_shape=dict(hidden_size=32, head_dim=8))
    assert other.register_dir("acme", "bot", tmp_path / "small").version == 2
    again = AdapterStore(tmp_path, spec)
    assert again.list("acme") == [mine]
    again.load(mine)  # its blob was not collected by the other base's start-up


def test_loads_hash_once_until_the_file_changes(tmp_path, spec, adapter_files, monkeypatch):
    """Registration hashed the bytes it wrote; a load re-hashes only a file that changed
    since (a cold load then costs a read and a parse, not two sha256 passes)."""
    from loraserve.adapters import store as store_module
    calls = []
    real = store_module.bytes_problem
    monkeypatch.setattr(store_module, "bytes_problem", lambda *a: calls.append(a[0]) or real(*a))
    store = AdapterStore(tmp_path, spec)
    record = store.register_bytes("acme", "bot", *adapter_files)
    store.load(record)
    store.load(record)
    assert calls == []
    reopened = AdapterStore(tmp_path, spec)          # a restart hashes on first load
    reopened.load(record)
    reopened.load(record)
    assert len(calls) == 1
    weights = os.path.join(record.path, "adapter_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 0xFF                                  # bit rot that rewrites the file
    open(weights, "wb").write(bytes(data))
    with pytest.raises(AdapterError, match="corrupted on disk"):
        reopened.load(record)
