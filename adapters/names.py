"""Adapter and tenant names, and the references requests use to name an adapter.

A reference is `name` (newest visible version), `name@3` (one version), or, for an
adapter another tenant shares, `owner/name[@3]`. `/`, `@` and `:` are syntax, so no
name may contain them; names are also directory names in the store, so no `..`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AdapterRejected

DEFAULT_TENANT = "default"  # the tenant of every caller when no API keys are configured

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REF = re.compile(r"^(?:(?P<owner>[^/@]+)/)?(?P<name>[^/@]+)(?:@(?P<version>[^/@]*))?$")


def check_name(name: str, what: str = "adapter name") -> str:
    """Return `name` if it is a valid adapter or tenant name, else raise AdapterRejected."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise AdapterRejected(f"{what} {name!r} is invalid; use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit (no '/', '@', ':' or '..')")
    return name


@dataclass(frozen=True)
class AdapterRefParts:
    """A parsed reference; `owner` and `version` are None when the reference omits them."""

    name: str
    owner: str | None = None
    version: int | None = None


def parse_ref(ref: str) -> AdapterRefParts:
    """Split `[owner/]name[@version]`, validating each part."""
    match = _REF.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise AdapterRejected(f"adapter reference {ref!r} is malformed; "
                              "write 'name', 'name@3', or 'owner/name@3' for another tenant's shared adapter")
    owner = check_name(match["owner"], "tenant name") if match["owner"] is not None else None
    version = match["version"]
    if version is not None and not (version.isdigit() and version.isascii() and int(version) > 0):
        raise AdapterRejected(f"version {version!r} in adapter reference {ref!r} must be a positive integer, "
                              "as in 'name@3'")
    return AdapterRefParts(check_name(match["name"]), owner, int(version) if version is not None else None)
