"""vLLM's runtime LoRA endpoints, answering as vLLM does so tools written for it work unchanged.

POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"} -> 200 text
"Success: LoRA adapter '<name>' added successfully."; a name already loaded without
load_inplace is a 400 with vLLM's message. POST /v1/unload_lora_adapter {"lora_name"}
-> 200 "... removed successfully."; an unknown name is a 404.

load_inplace registers the new weights as the next version and deletes the older
ones, as vLLM replaces them: requests running on the old weights finish on them, new
requests get the new ones, and no prefix-cache block computed with the old weights is
reused, because the cache is keyed by adapter version (vllm#42125 was exactly that bug).
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from starlette.responses import PlainTextResponse

from loraserve.adapters import AdapterNotFound, AdapterRejected, check_name

from .adapters_routes import delete_versions, register_source
from .auth import Caller, authenticate, require_admin
from .context import ServeContext
from .errors import APIError
from .openai_models import LoadLoRARequest, UnloadLoRARequest

router = APIRouter(tags=["vllm"])


async def own_versions(ctx: ServeContext, tenant: str, name: str) -> list:
    try:
        versions = await to_thread.run_sync(ctx.store.versions, tenant, name)
    except AdapterNotFound:
        return []
    return [r for r in versions if r.tenant == tenant]


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             summary="vLLM-compatible: load a PEFT adapter from a server path or hf:// (admin)")
async def load_lora_adapter(body: LoadLoRARequest, request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    require_admin(caller, "loading an adapter from a server path (lora_path)")
    name = check_name(body.lora_name)
    if name in ctx.base_names:
        raise APIError(400, f"The lora adapter name '{name}' conflicts with a served base model.", "lora_name")
    older = await own_versions(ctx, caller.tenant, name)
    if older and not body.load_inplace:
        raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                            "in place, set 'load_inplace' to True.", "lora_name")
    await register_source(ctx, caller.tenant, name, body.lora_path, shared=False)
    for record in older:
        try:
            await delete_versions(ctx, caller.tenant, f"{name}@{record.version}")
        except AdapterNotFound:   # deleted meanwhile by another call
            pass
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             summary="vLLM-compatible: remove an adapter (every version)")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    name = body.lora_name
    try:
        await delete_versions(ctx, caller.tenant, check_name(name))
    except (AdapterNotFound, AdapterRejected):   # an impossible name is unknown too
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "adapter_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
