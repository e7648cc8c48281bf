import pytest

from loraserve.adapters import AdapterRejected, check_name, parse_ref


@pytest.mark.parametrize("name", ["support-bot", "a", "A1", "v1.2_final", "x" * 64, "0day"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a/b", "../etc", "a..b", "bot@2", "org:bot",
                                  "sp ace", "x" * 65, "é", None, 3])
def test_invalid_names(name):
    with pytest.raises(AdapterRejected, match="invalid; use 1-64 letters"):
        check_name(name)


def test_parse_ref():
    assert parse_ref("bot") == parse_ref("bot")  # dataclass equality
    ref = parse_ref("bot")
    assert (ref.owner, ref.name, ref.version) == (None, "bot", None)
    ref = parse_ref("bot@3")
    assert (ref.owner, ref.name, ref.version) == (None, "bot", 3)
    ref = parse_ref("acme/bot@12")
    assert (ref.owner, ref.name, ref.version) == ("acme", "bot", 12)


@pytest.mark.parametrize("ref,needle", [
    ("bot@", "positive integer"), ("bot@0", "positive integer"), ("bot@x", "positive integer"),
    ("bot@-1", "positive integer"), ("a/b/c", "malformed"), ("bot@1@2", "malformed"),
    ("/bot", "malformed"), ("ac me/bot", "tenant name"), ("acme/..", "invalid"),
])
def test_bad_refs(ref, needle):
    with pytest.raises(AdapterRejected, match=needle):
        parse_ref(ref)
