"""Who is calling: a bearer key -> (tenant, admin). With no key file every caller is the
admin of the default tenant (the server then binds loopback only, unless told otherwise)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError
from .settings import DEFAULT_TENANT

bearer = HTTPBearer(auto_error=False, description="an API key made by `loraserve keys create`")


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


OPEN_CALLER = Caller(DEFAULT_TENANT, True)


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
    keyring = request.app.state.ctx.keyring
    if keyring is None:
        return OPEN_CALLER
    if credentials is None or not credentials.credentials:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'; "
                            "an operator makes one with `loraserve keys create`.", code="missing_api_key")
    entry = keyring.lookup(credentials.credentials)
    if entry is None:
        raise APIError(401, "Incorrect API key provided (unknown or revoked); ask the operator for a valid key.",
                       code="invalid_api_key")
    return Caller(entry.tenant, entry.admin)


def require_admin(caller: Caller, what: str) -> None:
    if not caller.admin:
        raise APIError(403, f"{what} needs an admin key; ask the operator, or use the tenant-scoped "
                            "alternative named in the API docs", code="admin_required")
