"""/v1/adapters: upload (multipart PEFT files, or an admin's JSON source), list, inspect, delete.

A tenant sees, uploads and deletes only its own adapters, and uses shared ones
read-only; another tenant's adapter answers 404 exactly like a missing one. An admin
names any tenant's adapter as `owner/name` and lists one with `?tenant=owner`.
Validation runs before anything is stored, so a rejected upload stores nothing.
"""

from __future__ import annotations

import json

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from loraserve.adapters import AdapterRecord, parse_ref

from .auth import Caller, authenticate, require_admin
from .context import ServeContext
from .errors import APIError, validation_message
from .model_names import public_id
from .openai_models import AdapterSourceRequest
from .uploads import read_capped_form

router = APIRouter(tags=["adapters"])

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["name", "adapter_config", "adapter_model"],
        "properties": {
            "name": {"type": "string", "description": "1-64 letters, digits, '.', '_' or '-'"},
            "shared": {"type": "boolean", "description": "visible read-only to every tenant (admin only)"},
            "adapter_config": {"type": "string", "format": "binary", "description": CONFIG_FILE},
            "adapter_model": {"type": "string", "format": "binary", "description": WEIGHTS_FILE}}}},
    "application/json": {"schema": AdapterSourceRequest.model_json_schema()},
}}


def adapter_object(caller: Caller, record: AdapterRecord, base_id: str) -> dict:
    return {"id": public_id(caller, record), "object": "adapter", "name": record.name, "owner": record.tenant,
            "version": record.version, "created": int(record.created_at), "rank": record.rank,
            "alpha": record.alpha, "use_rslora": record.use_rslora, "target_modules": list(record.target_modules),
            "sha256": record.sha256, "shared": record.shared, "bytes": record.num_bytes,
            "kinds": list(record.kinds), "copy_bytes": record.copy_bytes, "parent": base_id}


def scope(caller: Caller, ref: str) -> tuple[str, str]:
    """(tenant, reference within it): an admin's `owner/name@v` acts in owner's namespace."""
    parts = parse_ref(ref)
    if caller.admin and parts.owner is not None:
        return parts.owner, parts.name if parts.version is None else f"{parts.name}@{parts.version}"
    return caller.tenant, ref


@router.post("/v1/adapters", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY},
             summary="Register an adapter: multipart PEFT files, or JSON {name, source} (admin)")
async def upload_adapter(request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        record = await _register_source(ctx, caller, await _json_body(request))
    elif content_type.startswith("multipart/form-data"):
        record = await _register_upload(ctx, caller, request)
    else:
        raise APIError(415 if content_type else 400, "send the adapter as multipart/form-data (fields name, "
                       f"adapter_config = {CONFIG_FILE}, adapter_model = {WEIGHTS_FILE}) or, as an admin, as JSON "
                       "{\"name\", \"source\"}")
    return JSONResponse(adapter_object(caller, record, ctx.model_id), status_code=201)


async def _json_body(request: Request) -> AdapterSourceRequest:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    try:
        return AdapterSourceRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise APIError(400, message, param) from None


async def _register_source(ctx: ServeContext, caller: Caller, body: AdapterSourceRequest) -> AdapterRecord:
    require_admin(caller, "registering an adapter from a source (a server path or hf://)")
    return await register_source(ctx, caller.tenant, body.name, body.source, body.shared)


async def register_source(ctx: ServeContext, tenant: str, name: str, source: str, shared: bool) -> AdapterRecord:
    try:
        return await to_thread.run_sync(ctx.store.register_source, tenant, name, source, shared)
    except OSError as e:
        raise APIError(400, f"could not read the adapter at {source!r} ({e.strerror or e}); "
                            "check the path and its permissions", "source") from None


async def _register_upload(ctx: ServeContext, caller: Caller, request: Request) -> AdapterRecord:
    limit = ctx.settings.max_adapter_bytes
    form = await _read_form(request, limit)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "the form needs a 'name' field naming the adapter", "name")
        shared = _form_bool(form.get("shared"))
        if shared:
            require_admin(caller, "registering a shared adapter")
        config, weights = await _pick_files(form)
        size = len(config) + len(weights)
        if size > limit:
            raise APIError(413, f"the adapter is {size} bytes; this server takes at most {limit} "
                                "(--max-adapter-bytes)", "adapter_model", "adapter_too_large")
        return await to_thread.run_sync(ctx.store.register_bytes, caller.tenant, name, config, weights, shared)
    finally:
        await form.close()


async def _read_form(request: Request, limit: int):
    return await read_capped_form(request, limit, lambda size: _too_large(size, limit), 4, 8)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the upload is {size} bytes or more; this server takes adapters of at most {limit} "
                         "bytes (--max-adapter-bytes)", "adapter_model", "adapter_too_large")


def _form_bool(value) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise APIError(400, "the 'shared' field must be true or false", "shared")


async def _pick_files(form) -> tuple[bytes, bytes]:
    """The two PEFT files, by field name (adapter_config, adapter_model) or by file name."""
    config = weights = None
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            continue
        filename = (value.filename or "").rsplit("/", 1)[-1]
        if filename.endswith(".bin") or filename.endswith(".pt") or filename.endswith(".pth"):
            raise APIError(400, f"{filename} is a pickled checkpoint, refused because unpickling can execute "
                                f"code; upload {WEIGHTS_FILE} (PeftModel.save_pretrained writes it by default)",
                           field, "pickle_refused")
        if field in ("adapter_config", "config") or filename == CONFIG_FILE:
            config = await value.read()
        elif field in ("adapter_model", "weights", "model") or filename == WEIGHTS_FILE:
            weights = await value.read()
    if config is None or weights is None:
        missing = CONFIG_FILE if config is None else WEIGHTS_FILE
        raise APIError(400, f"the upload has no {missing}; send both files, as the form fields adapter_config "
                            f"({CONFIG_FILE}) and adapter_model ({WEIGHTS_FILE})",
                       "adapter_config" if config is None else "adapter_model")
    return config, weights


@router.get("/v1/adapters", summary="The adapters this tenant can use (own, then shared), newest version each")
async def list_adapters(request: Request, caller: Caller = Depends(authenticate),
                        tenant: str | None = Query(None, description="an admin may list another tenant's")):
    ctx: ServeContext = request.app.state.ctx
    who = caller
    if tenant is not None and tenant != caller.tenant:
        require_admin(caller, "listing another tenant's adapters")
        who = Caller(tenant, False)
    records = await to_thread.run_sync(ctx.store.list, who.tenant)
    return {"object": "list", "data": [adapter_object(who, r, ctx.model_id) for r in records]}


@router.get("/v1/adapters/{ref:path}", summary="One adapter (name, or name@3 for one version): its versions, "
                                               "and the tier each sits in now (device, cpu or disk)")
async def get_adapter(ref: str, request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    tenant, local = scope(caller, ref)
    if parse_ref(local).version is not None:      # name@3: that version alone
        versions = [await to_thread.run_sync(ctx.store.resolve, tenant, local)]
    else:
        versions = await to_thread.run_sync(ctx.store.versions, tenant, local)
    tiers = await ctx.engine.adapter_tiers(versions)
    who = Caller(tenant, caller.admin)
    newest = adapter_object(who, versions[-1], ctx.model_id)
    newest["versions"] = [{"version": r.version, "sha256": r.sha256, "rank": r.rank, "alpha": r.alpha,
                           "target_modules": list(r.target_modules), "created": int(r.created_at),
                           "bytes": r.num_bytes, "shared": r.shared, "tier": tier}
                          for r, tier in zip(versions, tiers)]
    newest["tier"] = tiers[-1]
    return newest


@router.delete("/v1/adapters/{ref:path}", summary="Delete an adapter (every version) or one version (name@3)")
async def delete_adapter(ref: str, request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    tenant, local = scope(caller, ref)
    doomed = await delete_versions(ctx, tenant, local)
    return {"id": ref, "object": "adapter.deleted", "deleted": True, "versions": [r.version for r in doomed]}


async def delete_versions(ctx: ServeContext, tenant: str, ref: str) -> list[AdapterRecord]:
    """Delete through the engine (on its thread): requests already accepted with a deleted
    version keep its weights and finish; cached copies go once no request uses them."""
    return await ctx.engine.remove_adapter(ref, tenant)
