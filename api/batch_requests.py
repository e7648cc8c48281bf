"""One batch line, answered by the very route code that answers a direct request.

A line's body goes through the endpoint's own request model and handler (chat.py,
completions.py), so a batch line and the same request sent directly get the same
checks, the same errors and, greedy, the same answer; whatever those routes learn to
do, batch lines do too. Three things differ, through a copy of the server's context:
the engine requests run at BATCH_PRIORITY (behind interactive traffic, scheduler.py),
they take no place in the interactive admission queue (the batch runner bounds them
itself), and they stay out of the latency histograms, which describe interactive traffic.
The batch runner (loraserve/batches) is handed a BatchRequests as its LineAnswerer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from types import SimpleNamespace

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from loraserve.batches import BatchManager, Owner
from loraserve.scheduler import BATCH_PRIORITY

from . import chat, completions
from .admission import Admission
from .auth import Caller
from .errors import APIError, from_exception, validation_message
from .metrics import ServerMetrics
from .openai_models import ChatCompletionRequest, CompletionRequest

ROUTES = {
    "/v1/chat/completions": (ChatCompletionRequest, chat.create_chat_completion),
    "/v1/completions": (CompletionRequest, completions.create_completion),
}


class BehindInteractive:
    """The server's engine, with every request it starts at BATCH_PRIORITY."""

    def __init__(self, engine):
        self._engine = engine

    def generate(self, *args, **kwargs):
        return self._engine.generate(*args, priority=BATCH_PRIORITY, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class BatchRequests:
    def __init__(self, ctx):
        batch_ctx = dataclasses.replace(ctx, engine=BehindInteractive(ctx.engine), metrics=ServerMetrics(),
                                        admission=Admission(ctx.engine.config.max_num_seqs, None))
        self._app = SimpleNamespace(state=SimpleNamespace(ctx=batch_ctx))
        self._engine = ctx.engine

    async def settle(self) -> None:
        """Return once the engine has taken every abort sent so far (its commands run in
        order), so no output is still on its way to an event loop about to close."""
        try:
            await self._engine.settle()
        except Exception:       # noqa: BLE001 - a dead engine sends nothing either
            pass

    async def answer(self, endpoint: str, body: object, owner: Owner) -> tuple[int, dict]:
        """(HTTP status, response body) of one request, as the endpoint would answer it
        for the batch's owner."""
        request_model, handler = ROUTES[endpoint]
        try:
            response = await handler(_parse(request_model, body), self._request(endpoint),
                                     Caller(owner.tenant, owner.admin))
            return response.status_code, json.loads(response.body)
        except asyncio.CancelledError:
            raise
        except Exception as e:      # noqa: BLE001 - every failure is this line's answer
            err = from_exception(e)
            return err.status, err.body()

    def _request(self, endpoint: str) -> Request:
        """What a route reads of its request: the app's context, a state, a connection
        that never reports a disconnect (cancelling the line's task is how it stops)."""
        scope = {"type": "http", "method": "POST", "path": endpoint, "headers": [], "query_string": b"",
                 "app": self._app, "state": {}}
        return Request(scope, receive=_never)


def batch_service(ctx) -> BatchManager | None:
    """The server's batch manager; None when the Batch API is off (no file store, or
    --batch-concurrency 0)."""
    if ctx.files is None or ctx.settings.batch_concurrency < 1:
        return None
    root = os.path.dirname(ctx.files.dir)
    return BatchManager(root, ctx.files, BatchRequests(ctx), ctx.settings.batch_concurrency)


def _parse(request_model: type[BaseModel], body: object) -> BaseModel:
    if not isinstance(body, dict):
        raise APIError(400, f"body must be a JSON object holding the request, got {type(body).__name__}", "body")
    if body.get("stream"):
        raise APIError(400, "stream is not supported for batch requests: each answer goes whole into the output "
                            "file; remove stream", "stream")
    try:
        return request_model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise APIError(400, message, param) from None


async def _never() -> dict:
    await anyio.sleep_forever()
    return {}
