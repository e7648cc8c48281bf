"""POST /v1/chat/completions: OpenAI's chat completions, plain or streamed (SSE).

The messages go through the model's chat template exactly as LLM.chat does, so an
answer here equals the offline engine's for the same messages and parameters.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request

from .auth import Caller, authenticate
from .context import ServeContext
from .errors import APIError
from .generation import Choice
from .logprobs import chat_logprobs
from .model_names import resolve_target
from .openai_models import ChatCompletionRequest
from .sampling import check_length, prepare, refuse_unsupported, sampling_params
from .serving import generate_response
from .structured import constrain, response_format_grammar
from .tool_stream import ToolChatRenderer
from .tools import check_forced_schemas, plan_tools

router = APIRouter()


def refuse_chat_unsupported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; send one of them", "max_tokens")


async def chat_grammar(ctx: ServeContext, body: ChatCompletionRequest, plan) -> tuple[str | None, str]:
    """The grammar the answer must follow (response_format, or a forced tool call) and the
    field a 400 about it names."""
    grammar = response_format_grammar(body.response_format, ctx.settings.max_schema_bytes)
    if plan is None or not plan.forced:
        return grammar, "response_format"
    if grammar is not None:
        raise APIError(400, "response_format cannot be combined with a forced tool call (tool_choice required or "
                            "a named function): the call's arguments are already JSON", "response_format")
    await check_forced_schemas(plan, ctx.grammar)
    return plan.grammar(ctx.grammar), "tool_choice"


@router.post("/v1/chat/completions", tags=["openai"],
             summary="Create a chat completion (OpenAI shape; stream: true for SSE)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, caller: Caller = Depends(authenticate)):
    request.state.arrival = time.monotonic()
    ctx: ServeContext = request.app.state.ctx
    refuse_unsupported(body)
    refuse_chat_unsupported(body)
    if body.n > ctx.settings.max_n:
        raise APIError(400, f"n is at most {ctx.settings.max_n} on this server, got {body.n}", "n")
    target = await resolve_target(ctx.store, caller, body.model, ctx.model_id, ctx.base_names)
    request.state.adapter = target.label   # the request counter's label
    plan = plan_tools(body, ctx.settings.tool_call_parser, ctx.prompts.chat_template, ctx.settings.max_schema_bytes)
    grammar, grammar_param = await chat_grammar(ctx, body, plan)
    ids = await ctx.prompts.encode_chat(body.messages, plan.template_tools() if plan else None)
    prompt = prepare(ctx.engine, ids, target, "messages")
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = check_length(len(ids), wanted, ctx.max_model_len, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs, ctx.vocab_size)
    await constrain(ctx.grammar, grammar, params, grammar_param)
    choices = [Choice(j, prompt, params[j]) for j in range(body.n)]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    renderer = ChatRenderer(ctx, request_id, body.model, logprobs, include_usage)
    if plan is not None:
        renderer = ToolChatRenderer(renderer, plan)
    return await generate_response(request, ctx, request_id, target, choices, [len(ids)],
                                   body.stream, include_usage, renderer)


class ChatRenderer:
    def __init__(self, ctx: ServeContext, request_id: str, model: str, logprobs: int | None, include_usage: bool):
        self.ctx = ctx
        self.request_id = request_id
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())

    def _logprobs(self, lps) -> dict | None:
        if self.logprobs is None or lps is None:
            return None
        return chat_logprobs(lps, self.ctx.prompts.token_text, self.logprobs)

    def final(self, choices: list[Choice], usage: dict) -> dict:
        return {"id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": c.index,
                             "message": {"role": "assistant", "content": c.out.text, "refusal": None},
                             "logprobs": self._logprobs(c.out.logprobs), "finish_reason": c.out.finish_reason}
                            for c in choices],
                "usage": usage, "system_fingerprint": None}

    def _chunk(self, choices: list[dict], **extra) -> dict:
        chunk = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def opening(self, choices: list[Choice]) -> list[dict]:
        return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for c in choices]

    def delta(self, c: Choice, out) -> list[dict]:
        new_lps = out.logprobs[c.num_sent_tokens:] if out.logprobs is not None else None
        c.num_sent_tokens = len(out.token_ids)
        if not out.delta_text and not out.finished and not new_lps:
            return []
        delta = {"content": out.delta_text} if out.delta_text or not out.finished else {}
        return [self._chunk([{"index": c.index, "delta": delta, "logprobs": self._logprobs(new_lps),
                              "finish_reason": out.finish_reason}])]

    def usage_chunk(self, usage: dict) -> dict:
        return self._chunk([], usage=usage)
