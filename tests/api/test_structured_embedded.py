"""Structured outputs and tools through the official `openai` client, against a live
server on the embedded SmolLM2 and two adapters.

- json_schema answers parse and fit the schema, for requests on the base model and both
  adapters in flight together, beside unconstrained requests whose answers stay exactly
  the offline engine's (a request without a grammar is not affected by one);
- json_object on completions (the extension), with n, streaming, stop strings, logprobs;
- forced tool calls (required, named, streamed) have arguments that fit the schema;
- auto tool calls are parsed from the model's own Hermes format: SmolLM2 does not call
  tools by itself, so a script stands in for the model (the runner's logits hook forces
  the tokens of a call), and the tool result renders back through the template.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from livekit import live_server
from peft_files import peft_files, write_peft_dir

from loraserve import LLM, SamplingParams
from loraserve.async_engine import AsyncEngine

pytestmark = pytest.mark.slow

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "London", "Tokyo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Invent a person. Answer in JSON with name, age and city."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"], "additionalProperties": False}}}
CAT = 'Here is a short JSON object with the keys "name" and "color" for a cat: '
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PLAIN = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
MODELS = (None, "one", "two")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    llm = LLM(dtype="float32", max_loras=2, max_lora_rank=16, max_model_len=1024, kv_cache_memory=64 << 20,
              adapter_dir=str(root / "store"))
    spec = llm.engine.spec
    for name, seed, targets in (("one", 1, ("q_proj", "v_proj")), ("two", 2, ("gate_proj", "up_proj"))):
        llm.add_adapter(name, write_peft_dir(str(root / name), peft_files(spec, rank=8, seed=seed, targets=targets,
                                                                          scale=0.2)))
    offline = {m: llm.chat([ASK], PLAIN, adapters=m, use_tqdm=False)[0].text for m in MODELS}
    engine = AsyncEngine(engine=llm.engine)
    try:
        with live_server(engine) as server:
            yield server, offline
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def base(served) -> str:
    return served[0].ctx.model_id


def batches_seen(server):
    """Record (adapter, constrained) of every sequence each step samples for."""
    steps = []
    hooks = server.engine.engine.hooks

    def hook(seqs, logits):
        steps.append({(s.adapter_key, bool(s.params.logits_processors)) for s in seqs})
    hooks.on_logits = hook
    return steps


def test_json_schema_answers_fit_across_adapters_in_one_mixed_batch(served, client, base):
    server, offline = served
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    jobs = [(m, constrained) for m in MODELS for constrained in (True, False)]

    def run(job):
        m, constrained = job
        extra = {"response_format": rf} if constrained else {"extra_body": {"ignore_eos": True}}
        return client.chat.completions.create(model=m or base, messages=ASK, temperature=0,
                                              max_tokens=60 if constrained else PLAIN.max_tokens, **extra)

    steps = batches_seen(server)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(run, jobs))
    finally:
        server.engine.engine.hooks.on_logits = None
    for (m, constrained), answer in zip(jobs, answers):
        text = answer.choices[0].message.content
        if constrained:
            assert answer.choices[0].finish_reason == "stop", (m, text)
            jsonschema.validate(json.loads(text), PERSON)
        else:
            assert text == offline[m], f"an unconstrained answer changed beside constrained ones (adapter {m})"
    mixed = [s for s in steps if {c for _, c in s} == {True, False} and len({a for a, _ in s}) == 3]
    assert mixed, "no step sampled constrained and unconstrained rows of all three models together"


def test_json_object_completions_with_n_stream_and_logprobs(client, base):
    stream = client.completions.create(model=base, prompt=CAT, max_tokens=40, temperature=0.5, seed=3, n=2,
                                       logprobs=1, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"response_format": {"type": "json_object"}})
    texts, finishes, num_logprobs, usage = {0: "", 1: ""}, {}, {0: 0, 1: 0}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            num_logprobs[c.index] += len(c.logprobs.tokens) if c.logprobs else 0
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert finishes == {0: "stop", 1: "stop"}, texts
    for i in (0, 1):
        assert isinstance(json.loads(texts[i]), dict), texts[i]
    assert usage is not None and usage.completion_tokens == num_logprobs[0] + num_logprobs[1]


def test_json_schema_with_a_stop_string_and_top_logprobs(client, base):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = client.chat.completions.create(model="two", messages=ASK, temperature=0, max_tokens=60, stop=['"age"'],
                                            logprobs=True, top_logprobs=2, response_format=rf)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content.startswith('{"name": "') and '"age"' not in choice.message.content
    assert len(choice.logprobs.content) == answer.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def _check_call(call, tools_by_name):
    assert call.type == "function" and call.id.startswith("call_")
    schema = tools_by_name[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_forced_tool_calls_have_valid_arguments(client, base):
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for m in MODELS:
        required = client.chat.completions.create(model=m or base, messages=WEATHER_ASK, tools=[WEATHER, TIME],
                                                  tool_choice="required", parallel_tool_calls=False,
                                                  temperature=0.7, seed=1, max_tokens=80)
        choice = required.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0], tools)
        named = client.chat.completions.create(model=m or base, messages=WEATHER_ASK, tools=[WEATHER, TIME],
                                               tool_choice={"type": "function", "function": {"name": "get_time"}},
                                               temperature=0, max_tokens=80)
        choice = named.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        _check_call(choice.message.tool_calls[0], tools)


def test_forced_tool_call_streams_as_openai_deltas(client, base):
    stream = client.chat.completions.create(model="one", messages=WEATHER_ASK, tools=[WEATHER],
                                            tool_choice="required", parallel_tool_calls=False, temperature=0,
                                            max_tokens=80, stream=True,
                                            stream_options={"include_usage": True})
    calls, finishes, chunks = {}, [], list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert finishes == ["tool_calls"], calls
    assert calls and all(e["name"] == "get_weather" and e["id"] for e in calls.values())
    for e in calls.values():
        jsonschema.validate(json.loads(e["arguments"]), WEATHER["function"]["parameters"])
    assert chunks[-1].usage is not None and chunks[-1].choices == []


class Script:
    """Stands in for the model: every sequence it samples for writes `text`, then EOS."""

    def __init__(self, server, text: str):
        engine = server.engine.engine
        self.hooks = engine.hooks
        self.ids = engine.tokenizer.encode(text, add_special_tokens=False) + [engine.tokenizer.eos_token_id]

    def __enter__(self):
        def force(seqs, logits):
            for row, seq in enumerate(seqs):
                k = min(len(seq.output_token_ids), len(self.ids) - 1)
                logits[row].fill_(-1e4)
                logits[row, self.ids[k]] = 0.0
        self.hooks.on_logits = force
        return self

    def __exit__(self, *exc):
        self.hooks.on_logits = None


CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' \
            '\n</tool_call>'


def test_auto_tool_calls_are_parsed_from_the_models_format(served, client, base):
    server, _ = served
    with Script(server, CALL_TEXT):
        answer = client.chat.completions.create(model="two", messages=WEATHER_ASK, tools=[WEATHER], max_tokens=60)
        chunks = list(client.chat.completions.create(model="two", messages=WEATHER_ASK, tools=[WEATHER],
                                                     max_tokens=60, stream=True))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Let me check." and "<tool_call" not in content
    assert streamed[0].function.name == "get_weather" and streamed[0].id
    assert json.loads("".join(d.function.arguments for d in streamed)) == {"city": "Paris", "unit": "celsius"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    history = WEATHER_ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                             {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    with Script(server, "It is 21 degrees in Paris."):
        follow = client.chat.completions.create(model="two", messages=history, tools=[WEATHER], max_tokens=30)
    assert follow.choices[0].message.content == "It is 21 degrees in Paris."
    assert follow.choices[0].finish_reason == "stop" and not follow.choices[0].message.tool_calls
    with server.client() as c:
        ids = c.post("/tokenize", json={"model": "two", "messages": history, "tools": [WEATHER]}).json()["tokens"]
        prompt = c.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt                  # the tool definitions
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in prompt  # the call made
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt            # its result
    assert follow.usage.prompt_tokens == len(ids)


def test_tool_choice_none_answers_in_text(client, base):
    answer = client.chat.completions.create(model=base, messages=WEATHER_ASK, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
