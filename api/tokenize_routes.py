"""vLLM's POST /tokenize and POST /detokenize, with vLLM's bodies and answers.

/tokenize takes a `prompt` (encoded as /v1/completions encodes it) or chat `messages`
(rendered through the chat template as /v1/chat/completions renders them, tools
included), and answers {count, max_model_len, tokens, token_strs}. /detokenize takes
{tokens} and answers {prompt}. `model` is optional; when given it must be one the
caller may use (adapters share the base model's tokenizer).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from .auth import Caller, authenticate
from .context import ServeContext
from .errors import APIError
from .model_names import resolve_target
from .openai_models import ChatMessage, Tool, _Strict

router = APIRouter(tags=["vllm"])


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None      # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


async def _check_model(ctx: ServeContext, caller: Caller, model: str | None) -> None:
    if model is not None:
        await resolve_target(ctx.store, caller, model, ctx.model_id, ctx.base_names)


@router.post("/tokenize", summary="vLLM-compatible: a prompt or chat messages to token ids")
async def tokenize(body: TokenizeRequest, request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    await _check_model(ctx, caller, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt (text) or messages (a chat)", "prompt")
    if body.messages is not None:
        if not body.add_generation_prompt:
            raise APIError(400, "add_generation_prompt: false is not supported; chats are tokenized as "
                                "/v1/chat/completions sends them", "add_generation_prompt")
        if body.add_special_tokens:
            raise APIError(400, "add_special_tokens: true is not supported for messages; the template writes "
                                "them", "add_special_tokens")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = await ctx.prompts.encode_chat(body.messages, tools)
    elif body.add_special_tokens is False:
        ids = await ctx.prompts.encode_text_plain(body.prompt)
    else:
        ids = await ctx.prompts.encode_text(body.prompt)
    strs = [ctx.prompts.tokenizer.convert_ids_to_tokens(i) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", summary="vLLM-compatible: token ids to text")
async def detokenize(body: DetokenizeRequest, request: Request, caller: Caller = Depends(authenticate)):
    ctx: ServeContext = request.app.state.ctx
    await _check_model(ctx, caller, body.model)
    vocab = len(ctx.prompts.tokenizer)
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise APIError(400, f"tokens must be ids in [0, {vocab}); got {bad[0]}", "tokens")
    return {"prompt": ctx.prompts.decode(body.tokens)}
