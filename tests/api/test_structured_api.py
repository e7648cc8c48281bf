"""Structured outputs, tools and the smaller fields on a tiny random llama (fast): a random
model under a bounded schema still always answers JSON that fits, forced tool calls
parse, logit_bias steers, /tokenize and /detokenize agree with the tokenizer, and every
bad schema, tool or bias is a 400 naming it while the server goes on serving."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from livekit import live_server, tiny_engine

from loraserve.api import ServerSettings

SMALL = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 6},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "ok": {"type": "boolean"}},
         "required": ["word", "n", "ok"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SMALL}}
MAX_SCHEMA_BYTES = 2048


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    base_dir, _ = tiny_llama
    engine = tiny_engine(base_dir, str(tmp_path_factory.mktemp("store")), max_model_len=512)
    try:
        with live_server(engine, ServerSettings(max_schema_bytes=MAX_SCHEMA_BYTES)) as s:
            yield s
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.ctx.model_id


def post(server, path: str, body: dict) -> httpx.Response:
    with server.client() as c:
        return c.post(path, json=body)


def chat(base, **kw) -> dict:
    return {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, **kw}


def test_a_random_model_under_a_schema_answers_json_that_fits(server, base):
    rf = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL}}
    r = post(server, "/v1/chat/completions", chat(base, response_format=rf, n=3, temperature=1.0, seed=5))
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SMALL)
    r = post(server, "/v1/completions", {"model": base, "prompt": "x", "max_tokens": 60, "response_format": rf})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SMALL)


def test_forced_tool_calls_on_a_random_model_parse_and_fit(server, base):
    for choice in ("required", {"type": "function", "function": {"name": "lookup"}}):
        r = post(server, "/v1/chat/completions", chat(base, tools=[TOOL], tool_choice=choice, parallel_tool_calls=False))
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        [call] = message["tool_calls"]
        assert call["function"]["name"] == "lookup"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SMALL)


def test_logit_bias_forces_a_token(server, base):
    r = post(server, "/v1/completions", {"model": base, "prompt": "x", "max_tokens": 4, "temperature": 1.0,
                                         "logit_bias": {"1234": 100}, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == server.ctx.prompts.decode([1234] * 4)


def test_tokenize_and_detokenize_agree_with_the_tokenizer(server, base):
    tok = server.ctx.prompts.tokenizer
    with server.client() as c:
        r = c.post("/tokenize", json={"model": base, "prompt": "Hello there", "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode("Hello there") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 512 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": tok.decode(r["tokens"])}
        chat_ids = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        usage = c.post("/v1/chat/completions", json=chat(base, max_tokens=1)).json()["usage"]
        assert usage["prompt_tokens"] == len(chat_ids)
        assert c.post("/detokenize", json={"tokens": [10 ** 7]}).status_code == 400
        assert c.post("/tokenize", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
        assert c.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 400


def _schema(s):
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}


BAD = [
    (chat("M", response_format=_schema({"type": "strng"})), "response_format", "strng"),
    (chat("M", response_format=_schema({"not": {"type": "string"}})), "response_format", "not"),
    (chat("M", response_format=_schema({"type": "integer", "minimum": 5, "maximum": 1})), "response_format", "minimum"),
    (chat("M", response_format=_schema({"enum": ["x" * 100] * 40})), "response_format", "limit"),
    (chat("M", response_format={"type": "json_schema"}), "response_format", "needs a json_schema"),
    (chat("M", response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format", "name"),
    (chat("M", tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "'nope', which is not in tools"),
    (chat("M", tool_choice="required"), "tool_choice", "needs tools"),
    (chat("M", tools=[TOOL, TOOL]), "tools", "more than once"),
    (chat("M", tools=[{"type": "function"}]), "tools", "required"),
    (chat("M", tools=[{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
          tool_choice="required"), "tools", "cannot be enforced"),
    (chat("M", tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), "response_format",
     "cannot be combined"),
    (chat("M", response_format={"type": "json_object"}, min_tokens=3), "min_tokens", "min_tokens"),
    (chat("M", logit_bias={"abc": 1}), "logit_bias", "not a token id"),
    (chat("M", logit_bias={"5": 200}), "logit_bias", "[-100, 100]"),
    (chat("M", functions=[{"name": "f"}]), "functions", "deprecated"),
    (chat("M", messages=[{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f",
                                                                                              "arguments": "{x"}}]}]),
     "messages", "not valid JSON"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[f"bad-{i}" for i in range(len(BAD))])
def test_bad_structured_requests_are_400_and_the_server_goes_on(server, base, body, param, words):
    body = {**body, "model": base}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert not server.engine.engine.requests, "a refused request left something in the engine"
    ok = post(server, "/v1/chat/completions", chat(base, max_tokens=2))
    assert ok.status_code == 200, ok.text


def test_echo_with_logprobs_scores_the_prompt_as_hf_does(server, base, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    ids = [5, 900, 31, 7000, 12, 44]
    r = post(server, "/v1/completions", {"model": base, "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 2,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_llama[0], dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - float(ref[i - 1, ids[i]])) < 1e-3, i
        assert len(lp["top_logprobs"][i]) >= 2
    assert lp["text_offset"] == sorted(lp["text_offset"])
    stream = []
    with server.client() as c, c.stream("POST", "/v1/completions", json={
            "model": base, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 2, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                stream.append(json.loads(line[6:]))
    first = stream[0]["choices"][0]["logprobs"]
    assert first["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:len(ids)], abs=1e-5)


def test_llama3_json_calls_are_parsed_plain_and_streamed(server, base):
    """A scripted model (the runner's logits hook forces the tokens) writes Llama 3's format."""
    tok = server.ctx.prompts.tokenizer
    text = '{"name": "lookup", "parameters": {"word": "hi", "n": 3, "ok": true}}'
    script = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    hooks = server.engine.engine.hooks

    def force(seqs, logits):
        for row, seq in enumerate(seqs):
            logits[row].fill_(-1e4)
            logits[row, script[min(len(seq.output_token_ids), len(script) - 1)]] = 0.0

    settings, hooks.on_logits = server.ctx.settings, force
    settings.tool_call_parser = "llama3_json"
    try:
        plain = post(server, "/v1/chat/completions", chat(base, tools=[TOOL])).json()
        with server.client() as c, c.stream("POST", "/v1/chat/completions",
                                            json=chat(base, tools=[TOOL], stream=True)) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    finally:
        settings.tool_call_parser, hooks.on_logits = "auto", None
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"]) == {"word": "hi", "n": 3, "ok": True}
    deltas = [d for e in events for ch in e["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == "lookup" and deltas[0]["id"].startswith("call_")
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"word": "hi", "n": 3, "ok": True}
    assert not "".join(ch["delta"].get("content") or "" for e in events for ch in e["choices"]).strip()
