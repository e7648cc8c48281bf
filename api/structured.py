"""`response_format` (json_object, json_schema) to a grammar, and a grammar to one
LogitsProcessor per choice (each choice's matcher advances with its own tokens).

Chat takes OpenAI's field; completions take the same field as an extension, as vLLM's
completions do. Every problem is a 400 naming the field: a schema that is not JSON
Schema, one using a keyword the grammar engine cannot enforce, one over the size limit.
"""

from __future__ import annotations

import json

from anyio import to_thread

from loraserve.grammar import GrammarCompiler, GrammarError
from loraserve.sampling_params import SamplingParams

from .errors import APIError
from .openai_models import ResponseFormat

ANY_OBJECT = {"type": "object"}


def response_format_grammar(rf: ResponseFormat | None, max_schema_bytes: int) -> str | None:
    """The grammar a response_format asks for; None for text (or no response_format)."""
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise APIError(400, "response_format.json_schema needs type 'json_schema'", "response_format")
        return None
    if rf.type == "json_object":
        return GrammarCompiler.json_schema(ANY_OBJECT)
    if rf.json_schema is None:
        raise APIError(400, "response_format of type 'json_schema' needs a json_schema: "
                            "{'name': ..., 'schema': {...}, 'strict': true}", "response_format")
    schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else ANY_OBJECT
    return schema_grammar(schema, max_schema_bytes, "response_format.json_schema.schema")


def schema_grammar(schema: dict, max_schema_bytes: int, where: str) -> str:
    check_schema_size(schema, max_schema_bytes, where)
    try:
        return GrammarCompiler.json_schema(schema)
    except GrammarError as e:
        raise APIError(400, f"{where}: {e}", where.split(".")[0]) from None


def check_schema_size(schema, max_schema_bytes: int, where: str) -> None:
    size = len(json.dumps(schema))
    if size > max_schema_bytes:
        raise APIError(400, f"{where} is {size} bytes of JSON; the limit on this server is {max_schema_bytes}",
                       where.split(".")[0])


async def constrain(compiler: GrammarCompiler, grammar: str | None, params: list[SamplingParams],
                    param: str) -> None:
    """Give each choice its own matcher for `grammar` (compiled off the event loop: a large
    schema can take a while, and the engine loop never compiles)."""
    if grammar is None:
        return
    if any(p.min_tokens for p in params):
        raise APIError(400, "min_tokens cannot be combined with a grammar (response_format or a forced tool "
                            "call): the grammar may end the answer earlier", "min_tokens")
    try:
        for p in params:
            p.logits_processors.append(await to_thread.run_sync(compiler.processor, grammar))
            p.grammar = grammar
    except GrammarError as e:
        raise APIError(400, f"{param} cannot be enforced: {e}", param) from None
