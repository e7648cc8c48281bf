"""/ui: the operator's console, a static page over three JSON views of its own.

The page and its scripts (with uPlot, vendored under console/vendor/) are plain files
served from the package, so it works with no network and no build step. The page holds
no data: it asks for an API key and sends it, as a bearer token, to the same routes a
client uses (/v1/adapters to upload and delete, /v1/fine_tuning/jobs, /v1/batches) and
to the views below. So a tenant's key shows that tenant's adapters (and shared ones,
read-only); an admin's shows every tenant's. Engine-wide figures (queue, KV blocks,
slots, latency) name no adapter and are shown to every key.
"""

from __future__ import annotations

from importlib.resources import files

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

from loraserve.adapters import AdapterRecord

from .auth import Caller, authenticate
from .console_state import ConsoleState
from .context import ServeContext
from .ops_routes import engine_stats

router = APIRouter(prefix="/ui", include_in_schema=False)

STATIC_DIR = str(files("loraserve.api") / "console")
# Every script, style and image from this server: the console must work offline.
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"


def install(app: FastAPI) -> None:
    app.state.console = ConsoleState(app.state.ctx.metrics)
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="console-static")


@router.get("")
@router.get("/")
async def page():
    return FileResponse(f"{STATIC_DIR}/index.html", headers={"Content-Security-Policy": CSP,
                                                             "Cache-Control": "no-cache"})


@router.get("/api/session")
async def session(request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    return {"tenant": caller.tenant, "admin": caller.admin, "model": ctx.model_id,
            "keys_required": ctx.keyring is not None, "finetuning": ctx.jobs is not None}


@router.get("/api/engine")
async def engine(request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    stats = await engine_stats(ctx)
    return request.app.state.console.snapshot(stats, ctx.admission)


@router.get("/api/adapters")
async def adapters(request: Request, caller: Caller = Depends(authenticate)):
    """Every version the caller may see, with its tier and its use since the server started."""
    ctx: ServeContext = request.app.state.ctx
    records = await to_thread.run_sync(visible_versions, ctx.store, caller)
    tiers = await ctx.engine.adapter_tiers(records)
    newest = {(r.tenant, r.name): r.version for r in records}   # records are sorted by version
    return {"object": "list", "data": [adapter_row(ctx, caller, r, tier, newest[(r.tenant, r.name)] == r.version)
                                       for r, tier in zip(records, tiers)]}


def visible_versions(store, caller: Caller) -> list[AdapterRecord]:
    """An admin: every tenant's versions. A tenant: its own, then the shared ones it may use."""
    if caller.admin:
        return store.owned()
    shared = [r for r in store.list(caller.tenant) if r.tenant != caller.tenant]
    others = [v for r in shared for v in store.versions(caller.tenant, f"{r.tenant}/{r.name}")]
    return store.owned(caller.tenant) + others


def adapter_row(ctx: ServeContext, caller: Caller, r: AdapterRecord, tier: str, latest: bool) -> dict:
    own = r.tenant == caller.tenant
    usage = ctx.metrics.usage.get(r.key)
    return {"ref": f"{r.name}@{r.version}" if own else f"{r.tenant}/{r.name}@{r.version}",
            "owner": r.tenant, "name": r.name, "version": r.version, "latest": latest, "tier": tier,
            "rank": r.rank, "alpha": r.alpha, "target_modules": list(r.target_modules), "bytes": r.num_bytes,
            "shared": r.shared, "created": int(r.created_at), "deletable": own or caller.admin,
            "requests": usage.requests, "prompt_tokens": usage.prompt_tokens,
            "generated_tokens": usage.generated_tokens, "last_used": usage.last_used}
