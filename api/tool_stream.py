"""Chat answers of a request with tools: the model's calls in `message.tool_calls`, and
in a stream as OpenAI's deltas.

Streaming: text that is surely content goes out as content deltas as it comes; a call
goes out once its block is complete, as OpenAI's two deltas (index, id, type and name
with empty arguments, then the arguments), which the `openai` client and every
OpenAI-compatible SDK accumulate into one call. The finish reason of an answer with
calls is "tool_calls" ("stop" for a named tool_choice, as OpenAI answers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .generation import Choice
from .tools import ToolPlan

if TYPE_CHECKING:
    from .chat import ChatRenderer


class ToolChatRenderer:
    """Wraps the plain ChatRenderer (which owns the envelope and logprobs)."""

    def __init__(self, base: "ChatRenderer", plan: ToolPlan):
        self.base = base
        self.plan = plan
        self._text: dict[int, str] = {}            # choice index -> text streamed through so far
        self._sent: dict[int, tuple[int, int]] = {}  # choice index -> (content chars, calls) sent

    def final(self, choices: list[Choice], usage: dict) -> dict:
        body = self.base.final(choices, usage)
        for c, entry in zip(choices, body["choices"]):
            scan = self.plan.parser.scan(c.out.text, finished=True)
            if scan.calls:
                entry["message"]["content"] = scan.content.strip() or None
                entry["message"]["tool_calls"] = [call.to_openai() for call in scan.calls]
                entry["finish_reason"] = self._finish_reason(c.out.finish_reason)
        return body

    def opening(self, choices: list[Choice]) -> list[dict]:
        return self.base.opening(choices)

    def usage_chunk(self, usage: dict) -> dict:
        return self.base.usage_chunk(usage)

    def _finish_reason(self, engine_reason: str | None) -> str | None:
        return self.plan.finish_reason if engine_reason == "stop" else engine_reason

    def delta(self, c: Choice, out) -> list[dict]:
        new_lps = out.logprobs[c.num_sent_tokens:] if out.logprobs is not None else None
        c.num_sent_tokens = len(out.token_ids)
        text = self._text[c.index] = self._text.get(c.index, "") + out.delta_text
        scan = self.plan.parser.scan(text, out.finished)
        num_chars, num_calls = self._sent.get(c.index, (0, 0))
        deltas = []
        if len(scan.content) > num_chars:
            deltas.append({"content": scan.content[num_chars:]})
        for k, call in enumerate(scan.calls[num_calls:], start=num_calls):
            deltas.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
        self._sent[c.index] = (max(num_chars, len(scan.content)), max(num_calls, len(scan.calls)))
        if not deltas and (new_lps or out.finished):
            deltas.append({})
        reason = (self._finish_reason(out.finish_reason) if self._sent[c.index][1] else out.finish_reason)
        chunks = []
        for j, delta in enumerate(deltas):
            last = j == len(deltas) - 1
            chunks.append(self.base._chunk([{"index": c.index, "delta": delta,
                                        "logprobs": self.base._logprobs(new_lps) if j == 0 else None,
                                        "finish_reason": reason if last else None}]))
        return chunks
