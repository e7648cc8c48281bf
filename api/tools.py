"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request -> a ToolPlan: what
the prompt offers the model, which calls are enforced by a grammar, and which format
the answer is parsed from.

- auto: the tools are in the prompt; calls the model writes in its format are parsed.
- required: the answer is one call (several with parallel_tool_calls) of any offered
  function, enforced by the grammar: the arguments always parse and fit the schema.
- a named function: exactly one call of that function, enforced the same way.
- none: the tools are left out of the prompt and nothing is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from anyio import to_thread

from loraserve.grammar import GrammarError

from .errors import APIError
from .openai_models import ChatCompletionRequest, FunctionDef, NamedToolChoice, Tool
from .structured import check_schema_size
from .tool_parsers import PARSERS, HermesParser, Llama3JsonParser, parser_for_template


@dataclass
class ToolPlan:
    tools: list[Tool]                      # offered in the prompt
    mode: str                              # auto | required | named
    parser: HermesParser | Llama3JsonParser
    parallel: bool
    named: str | None = None

    @property
    def forced(self) -> list[FunctionDef]:
        """The functions a grammar restricts the answer to; [] for auto."""
        if self.mode == "auto":
            return []
        return [t.function for t in self.tools if self.mode == "required" or t.function.name == self.named]

    def grammar(self, compiler) -> str | None:
        if self.mode == "auto":
            return None
        lark = self.parser.grammar(self.forced, self.parallel and self.mode == "required")
        return compiler.lark(lark)

    @property
    def finish_reason(self) -> str:
        """OpenAI answers "stop" for a call it was told to make by name, "tool_calls" otherwise."""
        return "stop" if self.mode == "named" else "tool_calls"

    def template_tools(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools]


def plan_tools(body: ChatCompletionRequest, parser_name: str, template: str | None,
               max_schema_bytes: int) -> ToolPlan | None:
    """None when the request uses no tools (or tool_choice none); a 400 names what is wrong."""
    if body.functions is not None or body.function_call is not None:
        raise APIError(400, "functions/function_call are deprecated and not served; send tools and tool_choice",
                       "functions" if body.functions is not None else "function_call")
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: send the functions the model may call in tools",
                           "tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise APIError(400, f"tools names a function more than once: {', '.join(duplicates)}", "tools")
    for i, t in enumerate(body.tools):
        check_schema_size(t.function.parameters or {}, max_schema_bytes, f"tools[{i}].function.parameters")
    if choice == "none":
        return None
    named = None
    if isinstance(choice, NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise APIError(400, f"tool_choice names the function {named!r}, which is not in tools "
                                f"(tools has: {', '.join(names)})", "tool_choice")
    mode = "named" if named else (choice or "auto")
    parser = PARSERS[parser_name] if parser_name != "auto" else parser_for_template(template)
    parallel = body.parallel_tool_calls is not False
    return ToolPlan(list(body.tools), mode, parser, parallel, named)


async def check_forced_schemas(plan: ToolPlan, compiler) -> None:
    """Each forced function's parameter schema must be enforceable; the 400 names the tool."""
    for i, t in enumerate(plan.tools):
        if t.function in plan.forced:
            try:
                grammar = compiler.json_schema(t.function.parameters or {"type": "object"})
                await to_thread.run_sync(compiler.check, grammar)
            except GrammarError as e:
                raise APIError(400, f"tools[{i}].function.parameters ({t.function.name}) cannot be enforced: {e}",
                               "tools") from None
