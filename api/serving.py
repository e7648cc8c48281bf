"""One generation request, start to end, for both OpenAI endpoints.

admit (429 at once when the queue is full) -> start the engine requests -> either wait
for all of them (a plain JSON answer) or wait for each one's first output and then
stream SSE chunks. However it ends (done, error, client gone, shutdown), the engine
requests are aborted if unfinished, the admission places are released, and the
request's real ending is left in request.state for the request counter (metrics.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Protocol

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .context import ServeContext
from .errors import from_exception
from .generation import Choice, ClientGone, Group, until_disconnect
from .model_names import Target

log = logging.getLogger(__name__)

CLIENT_GONE = 499   # nginx's status for "client closed the request"; metrics only


class Renderer(Protocol):
    def final(self, choices: list[Choice], usage: dict) -> dict: ...
    def opening(self, choices: list[Choice]) -> list[dict]: ...
    def delta(self, choice: Choice, out) -> list[dict]: ...
    def usage_chunk(self, usage: dict) -> dict: ...


def usage_of(choices: list[Choice], prompt_lens: list[int]) -> dict:
    completion = sum(len(c.out.token_ids) for c in choices if c.out is not None)
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def generate_response(request: Request, ctx: ServeContext, request_id: str, target: Target,
                            choices: list[Choice], prompt_lens: list[int], stream: bool, include_usage: bool,
                            renderer: Renderer) -> Response:
    ticket = ctx.admission.take(len(choices))
    group = Group(request_id, target, choices)
    handed_over = False
    try:
        group.start(ctx.engine, ctx.metrics, request.state.arrival)
        if not stream:
            await until_disconnect(request, group.run_to_end())
            return JSONResponse(renderer.final(choices, usage_of(choices, prompt_lens)))
        await until_disconnect(request, group.first_outputs())
        handed_over = True
        return StreamingResponse(_stream(ctx, request.state, group, ticket, renderer, prompt_lens, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    except ClientGone:
        return Response(status_code=CLIENT_GONE)   # nobody reads it; the metrics do
    except asyncio.CancelledError:
        request.state.final_status = CLIENT_GONE
        raise
    except Exception as e:
        err = from_exception(e)
        if err.status >= 500:
            log.error("request %s failed: %s", request_id, err.message)
        raise err from None
    finally:
        if not handed_over:
            group.close()
            ticket.release()


async def _stream(ctx: ServeContext, state, group: Group, ticket, renderer: Renderer,
                  prompt_lens: list[int], include_usage: bool):
    """The SSE body; `state.final_status` tells the request counter how it really ended."""
    status = 500
    try:
        for chunk in renderer.opening(group.choices):
            yield sse(chunk)
        async for choice, out in group.outputs():
            for chunk in renderer.delta(choice, out):
                yield sse(chunk)
        if include_usage:
            yield sse(renderer.usage_chunk(usage_of(group.choices, prompt_lens)))
        yield b"data: [DONE]\n\n"
        status = 200
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_GONE   # the client went away: Starlette cancels the stream
        raise
    except Exception as e:   # after the 200 went out: report in-band, as OpenAI does
        err = from_exception(e)
        status = err.status
        log.error("stream %s failed: %s", group.request_id, err.message)
        yield sse(err.body())
        yield b"data: [DONE]\n\n"
    finally:
        group.close()
        ticket.release()
        state.final_status = status
