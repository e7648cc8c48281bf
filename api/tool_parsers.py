"""A model's own tool-call format: parsed out of its text into OpenAI's tool_calls, and
written as a grammar when a call is forced (tool_choice required or a named function).

Formats are looked up by name (`--tool-call-parser`):
- `hermes`: Hermes/Qwen, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, after optional text;
- `llama3_json`: Llama 3.x, the whole answer is `{"name": ..., "parameters": {...}}`,
  several separated by `;` (an optional `<|python_tag|>` first).
Another format is one more class with `scan` and `grammar`, added to PARSERS.

`scan(text, finished)` is used both for a whole answer and while streaming: it returns
the text that is surely content (a prefix of `text` that only grows as text is added)
and the calls complete so far. Text that may still become a call is held back. An
answer whose call blocks do not parse is all content: nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from loraserve.grammar import JSON_OPTIONS

from .openai_models import FunctionDef


@dataclass
class ToolCall:
    name: str
    arguments: str                   # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Scan:
    content: str                     # surely content: safe to send
    calls: list[ToolCall]            # complete calls, in order


def _call_from(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):        # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _call_schema(functions: list[FunctionDef], args_key: str) -> dict:
    """One JSON object naming one of `functions`, its arguments fitting that function's schema."""
    choices = [{"type": "object",
                "properties": {"name": {"const": f.name}, args_key: f.parameters or {"type": "object"}},
                "required": ["name", args_key], "additionalProperties": False} for f in functions]
    return {"x-guidance": JSON_OPTIONS, "anyOf": choices}


class HermesParser:
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def scan(self, text: str, finished: bool) -> Scan:
        start = text.find(self.OPEN)
        if start < 0:
            return Scan(text if finished else text[: len(text) - _held_back(text, self.OPEN)], [])
        calls, valid = [], True
        for m in self.BLOCK.finditer(text, start):
            closed = m.group(0).endswith(self.CLOSE)
            if not closed and not finished:
                break                      # still being written
            call = _parse_json(m.group(1), "arguments")
            if call is not None:
                calls.append(call)
            elif closed:
                valid = False              # an unclosed last block is a call cut off by max_tokens: dropped
        if finished and (not calls or not valid):
            return Scan(text, [])          # not a well-formed call: the model's text as it is
        return Scan(text[:start], calls)

    def grammar(self, functions: list[FunctionDef], parallel: bool) -> str:
        schema = json.dumps(_call_schema(functions, "arguments"))
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "<tool_call>\\n" %json {schema} "\\n</tool_call>"\n'


class Llama3JsonParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def scan(self, text: str, finished: bool) -> Scan:
        body = text.lstrip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].lstrip()
        if not body or (not finished and self.TAG.startswith(body)):
            return Scan("" if not finished else text, [])
        if not body.startswith("{"):
            return Scan(text, [])          # plain text: no call in this format
        calls, rest = _decode_objects(body)
        parsed = [_call_from(obj, "parameters") for obj in calls]
        if finished and (not parsed or None in parsed or rest.strip()):
            return Scan(text, [])
        return Scan("", [c for c in parsed if c is not None])

    def grammar(self, functions: list[FunctionDef], parallel: bool) -> str:
        schema = json.dumps(_call_schema(functions, "parameters"))
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: %json {schema}\n"


def _parse_json(block: str, args_key: str) -> ToolCall | None:
    try:
        return _call_from(json.loads(block.strip()), args_key)
    except ValueError:
        return None


def _decode_objects(body: str) -> tuple[list, str]:
    """The complete JSON values at the start of body, separated by `;` or whitespace, and the rest."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
        try:
            obj, at_next = decoder.raw_decode(body, at)
        except ValueError:
            return objects, body[at:]
        objects.append(obj)
        at = at_next


PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser())}


def parser_for_template(template: str | None) -> HermesParser | Llama3JsonParser:
    """The format a chat template teaches: Llama 3's when it mentions its python tag or
    "parameters" JSON, else Hermes (also what templates without tools are taught)."""
    template = template or ""
    if "<|python_tag|>" in template or ('"parameters"' in template and "<tool_call>" not in template):
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]
