"""The API key file and `loraserve keys`: hashes only, keys shown once, live reloads."""

from __future__ import annotations

import os
import stat

import pytest

from loraserve.api.keys import KeyRing, create_key, hash_key, read_keys, revoke_key
from loraserve.api.cli import main


def test_create_stores_only_the_hash(tmp_path):
    path = str(tmp_path / "keys.json")
    key, entry = create_key(path, "acme", admin=True)
    text = open(path).read()
    assert key.startswith("lsk-") and len(key) > 40
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_keys(path) == [entry] and entry.admin and entry.tenant == "acme"


def test_keyring_follows_the_file(tmp_path):
    path = str(tmp_path / "keys.json")
    ring = KeyRing(path)
    assert ring.lookup("anything") is None and len(ring) == 0
    key, entry = create_key(path, "acme")
    assert ring.lookup(key).tenant == "acme"
    other, _ = create_key(path, "beta")
    assert ring.lookup(other).tenant == "beta" and ring.lookup(key) is not None
    revoke_key(path, key)                   # by the key itself
    assert ring.lookup(key) is None and ring.lookup(other) is not None
    with open(path, "w") as f:              # a broken edit keeps the last good keys
        f.write("{not json")
    assert ring.lookup(other) is not None
    os.remove(path)                         # no file: nobody gets in
    assert ring.lookup(other) is None


def test_bad_tenant_and_unknown_revoke(tmp_path):
    path = str(tmp_path / "keys.json")
    with pytest.raises(ValueError, match="tenant name"):
        create_key(path, "../etc")
    with pytest.raises(ValueError, match="no key"):
        revoke_key(path, "key-00000000")


def test_cli_create_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "keys.json")
    assert main(["keys", "create", "--file", path, "--tenant", "acme", "--admin"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("lsk-") and "shown only now" in err
    assert main(["keys", "list", "--file", path]) == 0
    listing = capsys.readouterr().out
    assert "tenant=acme" in listing and "admin" in listing and key not in listing
    key_id = listing.split()[0]
    assert main(["keys", "revoke", "--file", path, key_id]) == 0
    assert read_keys(path) == []
    assert main(["keys", "revoke", "--file", path, key_id]) == 2
