"""POST /v1/completions: OpenAI's legacy completions, plain or streamed (SSE).

`prompt` may be one text, a list of texts, token ids or a list of token-id lists; each
prompt gets `n` choices, numbered prompt_index * n + choice_index as OpenAI does.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from loraserve.prepared import PreparedPrompt

from .auth import Caller, authenticate
from .context import ServeContext
from .errors import APIError
from .generation import Choice, ClientGone, until_disconnect
from .logprobs import completion_logprobs
from .model_names import resolve_target
from .openai_models import CompletionRequest
from .prompt_logprobs import echo_logprobs, joined, score_prompts
from .sampling import check_length, prepare, refuse_unsupported, sampling_params
from .serving import CLIENT_GONE, generate_response
from .structured import constrain, response_format_grammar

router = APIRouter()


@router.post("/v1/completions", tags=["openai"], summary="Create a completion (OpenAI shape; stream: true for SSE)")
async def create_completion(body: CompletionRequest, request: Request, caller: Caller = Depends(authenticate)):
    request.state.arrival = time.monotonic()
    ctx: ServeContext = request.app.state.ctx
    refuse_unsupported(body)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server; remove it", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of must equal n ({body.n}) on this server; remove it", "best_of")
    if body.n > ctx.settings.max_n:
        raise APIError(400, f"n is at most {ctx.settings.max_n} on this server, got {body.n}", "n")
    target = await resolve_target(ctx.store, caller, body.model, ctx.model_id, ctx.base_names)
    request.state.adapter = target.label   # the request counter's label
    prompts = await _prompt_ids(ctx, body.prompt)
    prepared = [prepare(ctx.engine, ids, target) for ids in prompts]
    max_tokens = min(check_length(len(ids), body.max_tokens, ctx.max_model_len, "prompt") for ids in prompts)
    params = sampling_params(body, max_tokens, body.logprobs, ctx.vocab_size)
    grammar = response_format_grammar(body.response_format, ctx.settings.max_schema_bytes)
    await constrain(ctx.grammar, grammar, params, "response_format")
    choices = [Choice(p * body.n + j, prompt, params[j]) for p, prompt in enumerate(prepared) for j in range(body.n)]
    echo = [ctx.prompts.decode(ids) if isinstance(raw, list) else raw
            for raw, ids in zip(_as_list(body.prompt), prompts)] if body.echo else None
    request_id = f"cmpl-{uuid.uuid4().hex}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    renderer = CompletionRenderer(ctx, request_id, body.model, body.n, echo, body.logprobs, include_usage)
    if body.echo and body.logprobs is not None:
        try:
            renderer.echo_logprobs = await until_disconnect(request, _scored(ctx, prepared, body.logprobs,
                                                                             request_id))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return await generate_response(request, ctx, request_id, target, choices,
                                   [len(ids) for ids in prompts], body.stream, include_usage, renderer)


async def _scored(ctx: ServeContext, prompts: list[PreparedPrompt], top: int, request_id: str) -> list[dict]:
    """The echoed prompts' logprobs objects (prompt_logprobs.py), before generation starts."""
    scored = await score_prompts(ctx.engine, prompts, top, request_id)
    return [echo_logprobs(p.prompt_ids, s, ctx.prompts.token_text) for p, s in zip(prompts, scored)]


def _as_list(prompt) -> list:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


async def _prompt_ids(ctx: ServeContext, prompt) -> list[list[int]]:
    prompts = _as_list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty; send a string, a list of strings, or token ids", "prompt")
    if len(prompts) > ctx.settings.max_n * 8:
        raise APIError(400, f"at most {ctx.settings.max_n * 8} prompts per request, got {len(prompts)}", "prompt")
    return [await ctx.prompts.encode_text(p) if isinstance(p, str) else list(p) for p in prompts]


class CompletionRenderer:
    def __init__(self, ctx: ServeContext, request_id: str, model: str, n: int, echo: list[str] | None,
                 logprobs: int | None, include_usage: bool):
        self.ctx = ctx
        self.request_id = request_id
        self.model = model
        self.n = n
        self.echo = echo
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self.echo_logprobs: list[dict] | None = None   # per prompt, with echo and logprobs

    def _echo(self, c: Choice) -> str:
        return self.echo[c.index // self.n] if self.echo else ""

    def _envelope(self, choices: list[dict], **extra) -> dict:
        body = {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            body["usage"] = None   # OpenAI: null on every chunk but the last
        body.update(extra)
        return body

    def final(self, choices: list[Choice], usage: dict) -> dict:
        return self._envelope([self._choice(c.index, self._echo(c) + c.out.text, c.out.logprobs, c.out.finish_reason,
                                            self._echo_lp(c), len(self._echo(c))) for c in choices], usage=usage)

    def _echo_lp(self, c: Choice) -> dict | None:
        return self.echo_logprobs[c.index // self.n] if self.echo_logprobs else None

    def _choice(self, index: int, text: str, logprobs, finish_reason, echo_lp: dict | None = None,
                echo_len: int = 0) -> dict:
        lp = None
        if self.logprobs is not None and logprobs is not None:
            lp = completion_logprobs(logprobs, self.ctx.prompts.token_text)
        if echo_lp is not None:   # the echoed prompt's logprobs first, then the generated ones
            lp = joined(echo_lp, lp, echo_len)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def opening(self, choices: list[Choice]) -> list[dict]:
        if not self.echo:
            return []
        return [self._envelope([self._choice(c.index, self._echo(c), None, None, self._echo_lp(c))])
                for c in choices]

    def delta(self, c: Choice, out) -> list[dict]:
        new_lps = out.logprobs[c.num_sent_tokens:] if out.logprobs is not None else None
        c.num_sent_tokens = len(out.token_ids)
        if not out.delta_text and not out.finished and not new_lps:
            return []
        return [self._envelope([self._choice(c.index, out.delta_text, new_lps, out.finish_reason)])]

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope([], usage=usage)
