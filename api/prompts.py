"""Prompts to token ids, exactly as the offline LLM makes them, off the event loop.

Completions: `tokenizer.encode(text)` (what LLMEngine.encode does with a string).
Chat: the chat template rendered with add_generation_prompt=True, then encoded without
special tokens (loraserve/chat_template.py, which LLM.chat uses too). Token ids are
checked once, by the engine's `prepare`.
"""

from __future__ import annotations

import functools
import threading

from anyio import to_thread

from loraserve.chat_template import chat_prompt_ids

from .errors import APIError
from .openai_models import ChatMessage
from .tool_prompts import render_conversation, template_takes_tools


class Prompts:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()   # one encode at a time: HF fast tokenizers are not re-entrant

    async def encode_text(self, text: str) -> list[int]:
        return await to_thread.run_sync(self._locked, self.tokenizer.encode, text)

    async def encode_text_plain(self, text: str) -> list[int]:
        """Without the tokenizer's special tokens (vLLM's add_special_tokens: false)."""
        return await to_thread.run_sync(self._locked, lambda: self.tokenizer.encode(text, add_special_tokens=False))

    async def encode_chat(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
        """`tools` (OpenAI's tool objects) and tool turns go through tool_prompts.py."""
        conversation = [to_template_message(m) for m in messages]
        conversation, tools = render_conversation(conversation, tools, template_takes_tools(self.chat_template))
        return await to_thread.run_sync(self._locked, self._chat_ids, conversation, tools)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def _chat_ids(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        try:
            return chat_prompt_ids(self.tokenizer, conversation, tools)
        except Exception as e:   # a template that raises on this conversation (e.g. roles out of order)
            raise APIError(400, f"the model's chat template rejected these messages ({e})", "messages") from None

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def to_template_message(m: ChatMessage) -> dict:
    """{"role", "content"} with text parts joined; other part types are refused."""
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            text = getattr(part, "text", None)
            if part.type != "text" or not isinstance(text, str):
                raise APIError(400, f"message content part of type {part.type!r} is not supported; "
                                    "send text parts ({'type': 'text', 'text': ...}) only", "messages")
            texts.append(text)
        content = "\n".join(texts)
    role = "system" if m.role == "developer" else m.role
    message = {"role": role, "content": content or ""}
    extra = m.model_extra or {}
    if role == "assistant" and extra.get("tool_calls"):
        if not isinstance(extra["tool_calls"], list):
            raise APIError(400, "an assistant message's tool_calls must be a list", "messages")
        message["tool_calls"] = list(extra["tool_calls"])
    if role == "tool":
        message["tool_call_id"] = extra.get("tool_call_id")
        if m.name is not None:
            message["name"] = m.name
    return message
