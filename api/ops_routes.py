"""GET /health, GET /metrics (Prometheus text) and GET /v1/models."""

from __future__ import annotations

import asyncio

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from loraserve.engine_stats import EngineStats

from .auth import Caller, authenticate, require_admin
from .context import ServeContext
from .errors import APIError
from .model_names import public_id

router = APIRouter()

STATS_TIMEOUT_S = 10.0   # an engine step is far shorter; longer means the loop is stuck


async def engine_stats(ctx: ServeContext) -> EngineStats:
    try:
        return await asyncio.wait_for(ctx.engine.stats(), STATS_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(503, f"the engine loop did not answer within {STATS_TIMEOUT_S:.0f} s") from None


@router.get("/health", tags=["ops"], summary="200 while the engine loop is alive and the server takes requests")
async def health(request: Request):
    ctx: ServeContext = request.app.state.ctx
    if not ctx.engine.alive:
        raise APIError(503, f"the engine loop has stopped: {ctx.engine.error!r}",
                       code="engine_dead")
    if ctx.admission.draining:
        raise APIError(503, "the server is draining for shutdown", code="draining",
                       headers={"Retry-After": str(ctx.settings.retry_after)})
    return JSONResponse({"status": "ok"})


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics (admin when keys are on: it names every "
                                             "tenant's resident adapters)")
async def metrics(request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    require_admin(caller, "reading /metrics")
    stats = await engine_stats(ctx)
    a = ctx.admission
    body = ctx.metrics.render(stats, {"queued": a.num_queued, "in_flight": a.in_flight, "rejected": a.num_rejected})
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", tags=["openai"], summary="The base model and the adapters this tenant may use")
async def list_models(request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    created = int(ctx.started_at)
    base = {"id": ctx.model_id, "object": "model", "created": created, "owned_by": "loraserve",
            "root": ctx.model_id, "parent": None, "max_model_len": ctx.max_model_len}
    records = await to_thread.run_sync(ctx.store.list, caller.tenant)
    adapters = [{"id": public_id(caller, r), "object": "model", "created": int(r.created_at), "owned_by": r.tenant,
                 "root": f"{r.tenant}/{r.name}@{r.version}", "parent": ctx.model_id, "max_model_len": ctx.max_model_len}
                for r in records]
    return {"object": "list", "data": [base, *adapters]}
