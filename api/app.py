"""`build_app(engine, settings)`: the whole HTTP surface as a function of an engine-like
object (see context.py), so a Ray Serve deployment can wrap the same routes."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from . import (adapters_routes, batches_routes, chat, completions, console_routes, files_routes, finetune_routes,
               ops_routes, tokenize_routes, vllm_compat)
from .batch_requests import batch_service
from .context import ServeContext
from .errors import APIError, install_error_handlers
from .metrics import CountRequests
from .settings import ServerSettings

VERSION = "0.1.0"


def build_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(title="loraserve", version=VERSION,
                  description="One base model, many LoRA adapters, OpenAI-compatible. The `model` field names the "
                              "base model or an adapter (name, name@version, owner/name, base:name).")
    app.state.ctx = ServeContext.build(engine, settings)
    app.state.ctx.batches = batch_service(app.state.ctx)    # it answers lines through the routes: built after them
    install_error_handlers(app)
    for module in (completions, chat, ops_routes, adapters_routes, vllm_compat, files_routes, finetune_routes,
                   batches_routes, tokenize_routes):
        app.include_router(module.router)
    console_routes.install(app)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, exempt=("/v1/adapters", "/v1/files"))
    app.add_middleware(CountRequests, metrics=app.state.ctx.metrics,
                       endpoints={"/v1/completions": "completions", "/v1/chat/completions": "chat"})
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with this server's model id as the example `model` (docs, fuzzers)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        model_id = app.state.ctx.model_id
        examples = {
            "CompletionRequest": {"model": model_id, "prompt": "Say hello", "max_tokens": 8},
            "ChatCompletionRequest": {"model": model_id, "messages": [{"role": "user", "content": "Say hello"}],
                                      "max_tokens": 8},
        }
        for name, example in examples.items():
            component = schema.get("components", {}).get("schemas", {}).get(name)
            if component is not None:
                component["properties"]["model"]["examples"] = [model_id]
                component["examples"] = [example]
        app.openapi_schema = schema
    return app.openapi_schema


class BodyLimit:
    """413 for a request body over `limit` bytes (uploads have their own, larger limit)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...]):
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = APIError(413, f"the request body is {int(declared)} bytes; the limit is {self.limit}").response()
            return await response(scope, receive, send)
        seen = 0

        async def capped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"the request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, capped, send)
