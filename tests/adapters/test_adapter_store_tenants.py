"""Per-tenant namespaces and shared adapters: another tenant's private adapter is simply not there."""

import pytest

from loraserve.adapters import AdapterConflict, AdapterNotFound, AdapterStore


@pytest.fixture
def store(tmp_path, spec):
    return AdapterStore(tmp_path, spec)


def test_tenants_have_separate_namespaces(store, adapter_files, other_files):
    acme = store.register_bytes("acme", "support-bot", *adapter_files)
    globex = store.register_bytes("globex", "support-bot", *other_files)
    assert acme.version == globex.version == 1
    assert store.resolve("acme", "support-bot") == acme
    assert store.resolve("globex", "support-bot") == globex
    assert store.list("acme") == [acme] and store.list("globex") == [globex]


def test_private_adapter_is_not_found_with_the_same_message(store, adapter_files):
    store.register_bytes("acme", "secret", *adapter_files)
    messages = []
    for ref in ("secret", "never-existed"):
        with pytest.raises(AdapterNotFound) as info:
            store.resolve("globex", ref)
        messages.append(str(info.value).replace(ref, "REF"))
    assert messages[0] == messages[1]
    with pytest.raises(AdapterNotFound):
        store.resolve("globex", "acme/secret")
    assert store.list("globex") == []


def test_shared_adapter_is_visible_and_read_only(store, adapter_files):
    shared = store.register_bytes("acme", "base-chat", *adapter_files, shared=True)
    assert store.resolve("globex", "base-chat") == shared
    assert store.resolve("globex", "base-chat@1") == shared
    assert store.resolve("globex", "acme/base-chat") == shared
    assert store.list("globex") == [shared]
    assert store.versions("globex", "base-chat") == [shared]
    for ref in ("base-chat", "acme/base-chat", "base-chat@1"):
        with pytest.raises(AdapterNotFound):
            store.delete("globex", ref)
    assert store.resolve("acme", "base-chat") == shared


def test_other_tenants_see_only_shared_versions(store, adapter_files, other_files):
    v1 = store.register_bytes("acme", "bot", *adapter_files, shared=True)
    v2 = store.register_bytes("acme", "bot", *other_files)  # private draft
    assert store.resolve("acme", "bot") == v2
    assert store.resolve("globex", "bot") == v1
    with pytest.raises(AdapterNotFound):
        store.resolve("globex", "bot@2")
    assert store.list("globex") == [v1]


def test_own_name_shadows_shared_one(store, adapter_files, other_files):
    store.register_bytes("acme", "bot", *adapter_files, shared=True)
    own = store.register_bytes("globex", "bot", *other_files)
    assert store.resolve("globex", "bot") == own
    assert store.list("globex") == [own]
    assert store.resolve("globex", "acme/bot").tenant == "acme"


def test_ambiguous_shared_name_asks_for_the_owner(store, adapter_files, other_files):
    store.register_bytes("acme", "bot", *adapter_files, shared=True)
    globex = store.register_bytes("globex", "bot", *other_files, shared=True)
    with pytest.raises(AdapterConflict, match="shared by several tenants .acme, globex.*'acme/bot'"):
        store.resolve("initech", "bot")
    assert store.resolve("initech", "globex/bot") == globex
    assert {r.tenant for r in store.list("initech")} == {"acme", "globex"}


def test_list_shows_own_then_shared(store, adapter_files):
    own = store.register_bytes("globex", "alpha", *adapter_files)
    shared = store.register_bytes("acme", "alpha-shared", *adapter_files, shared=True)
    store.register_bytes("acme", "private", *adapter_files)
    assert store.list("globex") == [own, shared]
