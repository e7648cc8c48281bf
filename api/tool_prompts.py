"""Tools and tool turns of a chat, as the model's chat template wants them.

A template that takes tools (it reads `tools`) gets them as HF's `apply_chat_template`
passes them, and the history in HF's shape: an assistant turn's `tool_calls` with the
arguments as a mapping, a `tool` turn with its `tool_call_id` and `name`. A template
that does not (SmolLM2's) is taught the Hermes format the way Qwen's template does:
a system prompt listing the tools, calls written as `<tool_call>` blocks in the
assistant's text, and results as `<tool_response>` blocks in a user turn.
"""

from __future__ import annotations

import json

from .errors import APIError

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def template_takes_tools(template: str | None) -> bool:
    return "tools" in (template or "")


def render_conversation(conversation: list[dict], tools: list[dict] | None,
                        takes_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for apply_chat_template. `conversation` holds the request's turns
    as to_template_message makes them (tool_calls with JSON-text arguments)."""
    for i, m in enumerate(conversation):
        if m.get("tool_calls") is not None:
            m["tool_calls"] = [_history_call(c, i) for c in m["tool_calls"]]
    if takes_tools:
        return conversation, tools or None
    out = [_hermes_turn(m) for m in conversation]
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _history_call(call, i: int) -> dict:
    """An assistant turn's tool call, from OpenAI's shape to HF's (arguments as a mapping)."""
    where = f"messages[{i}].tool_calls"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{where}: each call needs function.name and function.arguments", "messages")
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise APIError(400, f"{where}: function.arguments of {function['name']!r} is not valid JSON",
                       "messages") from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}: function.arguments must be a JSON object", "messages")
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _hermes_turn(m: dict) -> dict:
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    if m.get("tool_calls"):
        blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                             ensure_ascii=False) for c in m["tool_calls"]]
        text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
        content = f"{m['content']}\n{text}" if m["content"] else text
        return {"role": m["role"], "content": content}
    return {"role": m["role"], "content": m["content"]}
