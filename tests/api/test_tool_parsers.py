"""Tool-call formats without a model: whole answers, every prefix of a streamed one (the
content sent only grows, and calls appear once complete), malformed calls kept as text;
tool turns rendered through a template that takes tools and one that does not; and the
forced-call grammars, walked with llguidance on the embedded tokenizer, accept the
format the parser reads and nothing else."""

from __future__ import annotations

import asyncio
import json

import pytest

from loraserve.api.openai_models import ChatMessage, FunctionDef
from loraserve.api.prompts import Prompts
from loraserve.api.tool_parsers import PARSERS, parser_for_template

HERMES = PARSERS["hermes"]
LLAMA = PARSERS["llama3_json"]
TWO_CALLS = ('I will look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
             '<tool_call>\n{"name": "b", "arguments": {"y": "z"}}\n</tool_call>')


def test_hermes_whole_answers():
    scan = HERMES.scan(TWO_CALLS, finished=True)
    assert scan.content == "I will look.\n"
    assert [(c.name, json.loads(c.arguments)) for c in scan.calls] == [("a", {"x": 1}), ("b", {"y": "z"})]
    assert HERMES.scan("just text", True).content == "just text"
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert HERMES.scan(broken, True).content == broken and not HERMES.scan(broken, True).calls
    cut = TWO_CALLS[:-30]   # max_tokens in the middle of the second call: the first stands
    assert [c.name for c in HERMES.scan(cut, True).calls] == ["a"]


@pytest.mark.parametrize("parser, text", [
    (HERMES, TWO_CALLS),
    (HERMES, "no calls here, but a < and <tool"),
    (LLAMA, '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'),
    (LLAMA, "plain {text}"),
])
def test_streamed_prefixes_only_grow_and_end_as_the_whole_answer(parser, text):
    sent, calls = "", []
    for end in range(len(text) + 1):
        scan = parser.scan(text[:end], finished=False)
        assert scan.content.startswith(sent) and text.startswith(scan.content), (end, scan.content)
        assert [c.name for c in scan.calls[:len(calls)]] == [c.name for c in calls]
        sent, calls = scan.content, scan.calls
    final = parser.scan(text, finished=True)
    assert final.content.startswith(sent)
    assert [c.name for c in final.calls] == [c.name for c in calls] or not calls
    assert "<tool" not in sent or not final.calls


def test_llama3_json_answers():
    scan = LLAMA.scan('<|python_tag|>{"name": "get", "parameters": {"q": "x"}}', True)
    assert scan.content == "" and [(c.name, c.arguments) for c in scan.calls] == [("get", '{"q": "x"}')]
    assert LLAMA.scan('{"not": "a call"}', True).calls == []
    assert parser_for_template("{{ '<|python_tag|>' }}") is LLAMA
    assert parser_for_template("<tool_call>") is HERMES and parser_for_template(None) is HERMES


QWEN_LIKE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
             "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
             "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
             "{{ c.function.arguments.city }}{% endfor %}{% endif %}"
             "{% if m.role == 'tool' %} id={{ m.tool_call_id }}{% endif %}\n{% endfor %}<assistant>")


def _history():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    return [ChatMessage(role="user", content="Weather in Oslo?"),
            ChatMessage(role="assistant", content=None, tool_calls=[call]),
            ChatMessage(role="tool", content="-3C", tool_call_id="call_1")]


def test_a_template_that_takes_tools_gets_them_and_the_history_in_hf_shape(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = QWEN_LIKE
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = Prompts(tok).decode(asyncio.run(Prompts(tok).encode_chat(_history(), tools)))
    assert text.startswith("TOOLS:get_weather;")
    assert "CALL get_weather Oslo" in text and "<tool>-3C id=call_1" in text


def test_a_template_without_tools_is_taught_the_hermes_format(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = Prompts(tok).decode(asyncio.run(Prompts(tok).encode_chat(_history(), tools)))
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n-3C\n</tool_response>" in text


@pytest.mark.parametrize("parser", [HERMES, LLAMA])
def test_forced_call_grammar_takes_the_parsers_format(parser, tokenizer_dir):
    import llguidance
    from transformers import AutoTokenizer

    from loraserve.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    compiler = GrammarCompiler(tok, len(tok))
    fn = FunctionDef(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"], "additionalProperties": False})
    grammar = compiler.lark(parser.grammar([fn], parallel=False))
    key = "arguments" if parser is HERMES else "parameters"
    good = json.dumps({"name": "get_weather", key: {"city": "Oslo"}})
    text = f"<tool_call>\n{good}\n</tool_call>" if parser is HERMES else good
    for candidate, ok in ((text, True), (text.replace("Oslo", "Oslo", 1).replace("city", "town"), False),
                          (text.replace("get_weather", "get_time"), False)):
        matcher = llguidance.LLMatcher(compiler.ll_tokenizer, grammar, log_level=0)
        accepted = matcher.consume_tokens(tok.encode(candidate, add_special_tokens=False)) and matcher.is_accepting()
        assert bool(accepted) == ok, candidate
    assert [c.name for c in parser.scan(text, True).calls] == ["get_weather"]
