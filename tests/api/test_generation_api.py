"""/v1/completions and /v1/chat/completions on a tiny random llama: response shapes and
parameters, every kind of bad input (400 in OpenAI's error shape, and the server keeps
serving), 429 under a flood, client disconnects abort, and an engine fault is a 500."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from livekit import StepGate, live_server, tiny_engine, wait_until
from peft_files import read_dir, upload

from loraserve.api import ServerSettings

MAX_NUM_SEQS = 4
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    base_dir, _ = tiny_llama
    engine = tiny_engine(base_dir, str(tmp_path_factory.mktemp("store")), max_num_seqs=MAX_NUM_SEQS)
    try:
        with live_server(engine, ServerSettings(max_queue=MAX_QUEUE)) as s:
            yield s
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.ctx.model_id


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    with server.client() as c:
        return c.post(path, json=body, **kw)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


# -- shapes and parameters ----------------------------------------------------------------

def test_completion_shape_usage_and_n(server, base):
    r = post(server, "/v1/completions", {"model": base, "prompt": ["one two", "three"], "n": 2, "max_tokens": 5,
                                         "temperature": 0.8, "seed": 7, "ignore_eos": True, "user": "u-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    tok = server.ctx.prompts.tokenizer
    prompt_tokens = len(tok.encode("one two")) + len(tok.encode("three"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20}
    again = post(server, "/v1/completions", {"model": base, "prompt": ["one two", "three"], "n": 2, "max_tokens": 5,
                                             "temperature": 0.8, "seed": 7, "ignore_eos": True}).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]], "same seed, same output"
    assert body["choices"][0]["text"] != body["choices"][1]["text"], "choices of one prompt differ"


def test_token_id_prompt_echo_and_max_tokens_default(server, base):
    ids = server.ctx.prompts.tokenizer.encode("hello world")
    by_text = post(server, "/v1/completions", {"model": base, "prompt": "hello world", "temperature": 0}).json()
    by_ids = post(server, "/v1/completions", {"model": base, "prompt": ids, "temperature": 0, "echo": True}).json()
    assert by_text["usage"]["completion_tokens"] <= 16          # OpenAI's default max_tokens
    assert by_ids["choices"][0]["text"] == "hello world" + by_text["choices"][0]["text"]


def test_stop_string_cuts_the_text(server, base):
    free = post(server, "/v1/completions", {"model": base, "prompt": "stop here", "max_tokens": 12,
                                            "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), free
    cut = post(server, "/v1/completions", {"model": base, "prompt": "stop here", "max_tokens": 12, "temperature": 0,
                                           "ignore_eos": True, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free[:free.index(stop)]


def test_logprobs_shapes(server, base):
    comp = post(server, "/v1/completions", {"model": base, "prompt": "a b c", "max_tokens": 4, "temperature": 0,
                                            "logprobs": 3, "ignore_eos": True}).json()["choices"][0]["logprobs"]
    assert len(comp["tokens"]) == len(comp["token_logprobs"]) == len(comp["top_logprobs"]) == 4
    assert all(3 <= len(top) <= 4 for top in comp["top_logprobs"])
    assert "".join(comp["tokens"]).strip() != ""
    chat = post(server, "/v1/chat/completions", {"model": base, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
                                                 "ignore_eos": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())


def test_streams_equal_plain_answers_and_count_usage(server, base):
    body = {"model": base, "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True, "n": 2}
    plain = post(server, "/v1/chat/completions", body).json()
    with server.client() as c, c.stream("POST", "/v1/chat/completions",
                                        json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    for i in range(2):
        deltas = [e["choices"][0]["delta"] for e in events[:-2] if e["choices"][0]["index"] == i]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content", "") for d in deltas) == plain["choices"][i]["message"]["content"]
    comp = {"model": base, "prompt": "count: one", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}
    plain = post(server, "/v1/completions", comp).json()
    with server.client() as c, c.stream("POST", "/v1/completions", json={**comp, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain["choices"][0]["text"]
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-1]) == 6


# -- bad input ----------------------------------------------------------------------------

BAD = [
    ({"prompt": "hi"}, "model", "required"),
    ({"model": "MODEL", "prompt": "hi", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"model": "MODEL", "prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "MODEL", "prompt": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "MODEL", "prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "MODEL", "prompt": "hi", "frequency_penalty": -3}, "frequency_penalty", "greater than or equal"),
    ({"model": "MODEL", "prompt": "hi", "n": 0}, "n", "greater than or equal to 1"),
    ({"model": "MODEL", "prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"model": "MODEL", "prompt": "hi", "bogus_field": 1}, "bogus_field", "Unrecognized request argument"),
    ({"model": "MODEL", "prompt": "hi", "logit_bias": {"x5": 1.0}}, "logit_bias", "not a token id"),
    ({"model": "MODEL", "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"model": "MODEL", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "MODEL", "prompt": "hi", "max_tokens": 100000}, "max_tokens", "maximum context length"),
    ({"model": "MODEL", "prompt": "word " * 400}, "prompt", "maximum context length"),
    ({"model": "MODEL", "prompt": []}, "prompt", "empty"),
    ({"model": "MODEL", "prompt": [-1, 5]}, "prompt", "token ids"),
    ({"model": "MODEL", "prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
    ({"model": "MODEL", "prompt": "hi", "min_tokens": 20, "max_tokens": 5}, None, "min_tokens"),
]

BAD_CHAT = [
    ({"model": "MODEL", "messages": []}, "messages", "at least 1"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "not supported"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools", "required"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
     "response_format", "needs a json_schema"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     "logprobs: true"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000},
     "max_tokens", "maximum context length"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[f"completions-{i}" for i in range(len(BAD))])
def test_bad_completion_requests_are_400(server, base, body, param, words):
    body = {k: (base if v == "MODEL" else v) for k, v in body.items()}
    err = assert_error(post(server, "/v1/completions", body), 400, words)
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("body,param,words", BAD_CHAT, ids=[f"chat-{i}" for i in range(len(BAD_CHAT))])
def test_bad_chat_requests_are_400(server, base, body, param, words):
    body = {k: (base if v == "MODEL" else v) for k, v in body.items()}
    err = assert_error(post(server, "/v1/chat/completions", body), 400, words)
    assert err["param"] == param, err


def test_bad_json_and_wrong_body_types_are_400_and_the_server_keeps_serving(server, base):
    with server.client() as c:
        assert_error(c.post("/v1/completions", content=b'{"model": "x", "prompt": ', 
                            headers={"content-type": "application/json"}), 400, "not valid JSON")
        assert_error(c.post("/v1/chat/completions", content=b"[1, 2]",
                            headers={"content-type": "application/json"}), 400, "JSON object")
        assert_error(c.post("/v1/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}),
                     400)
        assert_error(c.get("/v1/nothing-here"), 404, "no route")
        assert_error(c.get("/v1/completions"), 405)
        ok = c.post("/v1/completions", json={"model": base, "prompt": "still alive", "max_tokens": 2})
        assert ok.status_code == 200


def test_unknown_models_are_404(server, base):
    for model in ("nope", f"{base}:nope", "other:r4", "bad/name/x", "a@b"):
        err = assert_error(post(server, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}), 404,
                           model)
        assert err["code"] == "model_not_found" and err["param"] == "model"


# -- load and faults ----------------------------------------------------------------------

def test_flood_gets_429_with_retry_after_and_admitted_requests_finish(server, base):
    flood, admitted = 16, MAX_NUM_SEQS + MAX_QUEUE
    body = {"model": base, "prompt": "flood", "max_tokens": 48, "temperature": 0, "ignore_eos": True}

    def send(_):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/completions", json=body)

    with StepGate(server.engine.engine) as gate, ThreadPoolExecutor(flood) as pool:
        futures = [pool.submit(send, i) for i in range(flood)]
        # the engine makes no progress while the gate is shut: what is answered meanwhile
        # was answered at once, without queueing behind generation
        decided = wait_until(lambda: sum(f.done() for f in futures) == flood - admitted
                             and server.ctx.admission.in_flight == admitted, timeout=60)
        early = [f.result() for f in futures if f.done()]
        gate.open()
        results = [f.result() for f in futures]
    assert decided, [f.done() for f in futures]
    assert len(early) == flood - admitted and all(r.status_code == 429 for r in early), [r.status_code for r in early]
    for r in early:
        assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
    served = [r for r in results if r.status_code == 200]
    assert len(served) == admitted, [r.status_code for r in results]
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in served), "admitted requests are unaffected"
    assert server.metric("loraserve_requests_total", endpoint="completions", status="429", adapter=base) \
        == len(early)


def pinned_slots(server) -> int:
    """Adapter slots pinned by requests: the metric when the engine reports it, else the slots' own count."""
    value = server.metric("loraserve_adapter_slots_pinned")
    if value is not None:
        return int(value)
    return len(getattr(server.engine.engine.slots, "pins", {}) or {})


def engine_idle(server) -> bool:
    running = server.metric("loraserve_num_requests_running")
    used = server.metric("loraserve_kv_blocks_used")
    return running == 0 and used == 0 and pinned_slots(server) == 0 and server.ctx.admission.in_flight == 0


def test_disconnect_mid_stream_aborts_the_request(server, tiny_llama):
    with server.client() as c:
        assert upload(c, "story", read_dir(tiny_llama[1]["r4"])).status_code == 201
    with StepGate(server.engine.engine) as gate:
        gate.allow(4)                   # the prefill and three more tokens, then the engine holds
        with server.client() as c:
            with c.stream("POST", "/v1/completions", json={"model": "story", "prompt": "a long story",
                                                           "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(4)]
                assert any(g.startswith("data: ") for g in got)
                assert server.metric("loraserve_num_requests_running") == 1
                assert server.metric("loraserve_kv_blocks_used") > 0
                assert pinned_slots(server) == 1
        # leaving the block closed the connection with 96 of 100 tokens still to generate
        assert wait_until(lambda: server.ctx.admission.in_flight == 0, timeout=30), "the disconnect went unnoticed"
        gate.open()
        assert wait_until(lambda: engine_idle(server), timeout=30), "the request is still holding resources"
        assert gate.num_steps <= 5, f"the request ran {gate.num_steps} steps: it went on after the disconnect"
    assert server.metric("loraserve_requests_total", endpoint="completions", status="499", adapter="default/story") >= 1


def test_disconnect_while_waiting_for_a_plain_answer_aborts_it(server, base):
    body = json.dumps({"model": base, "messages": [{"role": "user", "content": "x"}], "max_tokens": 80,
                       "ignore_eos": True}).encode()
    with StepGate(server.engine.engine) as gate:     # shut: the answer cannot come before the client goes away
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert wait_until(lambda: server.ctx.admission.in_flight == 1, timeout=30), "the request never arrived"
        # the client has gone: the server notices (it polls a plain request's connection) and
        # gives its place back while the engine still cannot make progress
        assert wait_until(lambda: server.ctx.admission.in_flight == 0, timeout=30), "the disconnect went unnoticed"
        gate.open()
        assert wait_until(lambda: engine_idle(server), timeout=30), "the request is still holding resources"
        assert gate.num_steps <= 5, f"the request ran {gate.num_steps} steps: it went on after the disconnect"


def test_a_fault_in_one_request_is_its_500_and_the_others_go_on(server, base):
    core = server.engine.engine
    doomed = server.ctx.prompts.tokenizer.encode("boom boom boom")

    def faulty(seq, token_id):              # one request's post-processing
        if seq.prompt_token_ids == doomed:
            raise RuntimeError("injected fault")

    core.hooks.on_token = faulty
    gate = StepGate(core)
    try:
        with ThreadPoolExecutor(2) as pool:
            bystander = pool.submit(post, server, "/v1/completions", {"model": base, "prompt": "bystander",
                                                                       "max_tokens": 30, "ignore_eos": True})
            gate.allow(2)               # the bystander is running when the doomed request joins it
            assert wait_until(lambda: gate.num_steps == 2, timeout=30)
            doomed_answer = pool.submit(post, server, "/v1/completions",
                                        {"model": base, "prompt": doomed, "max_tokens": 3})
            assert wait_until(lambda: server.ctx.admission.in_flight == 2, timeout=30)
            gate.open()
            err = assert_error(doomed_answer.result(), 500)
            assert err["type"] == "server_error" and "injected fault" in err["message"]
            with server.client() as c, c.stream("POST", "/v1/chat/completions", json={
                    "model": base, "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
                assert r.status_code == 200
            with server.client() as c, c.stream("POST", "/v1/completions", json={
                    "model": base, "prompt": doomed, "max_tokens": 3, "stream": True}) as r:
                assert r.status_code == 500
            assert bystander.result().status_code == 200
            assert bystander.result().json()["usage"]["completion_tokens"] == 30
    finally:
        core.hooks.on_token = None
        gate.close()
    ok = post(server, "/v1/completions", {"model": base, "prompt": doomed, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    with server.client() as c:
        assert c.get("/health").status_code == 200


def test_metrics_expose_every_family(server, base):
    assert post(server, "/v1/completions", {"model": base, "prompt": "measure me", "max_tokens": 4}).status_code == 200
    with server.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("loraserve_requests", "loraserve_prompt_tokens", "loraserve_generation_tokens",
                 "loraserve_time_to_first_token_seconds", "loraserve_inter_token_latency_seconds",
                 "loraserve_e2e_request_latency_seconds", "loraserve_num_requests_running",
                 "loraserve_num_requests_waiting", "loraserve_kv_blocks_used", "loraserve_kv_blocks_total",
                 "loraserve_adapter_slots_used", "loraserve_adapter_slots_total", "loraserve_adapter_loads",
                 "loraserve_adapter_evictions", "loraserve_adapter_load_seconds", "loraserve_adapter_tier_hits",
                 "loraserve_adapter_resident", "loraserve_base_weight_bytes", "loraserve_adapter_slot_bytes"):
        assert name in families, name
    ttft = {s.name: s.value for s in families["loraserve_time_to_first_token_seconds"].samples}
    assert ttft["loraserve_time_to_first_token_seconds_count"] >= 1
    assert server.metric("loraserve_generation_tokens_total", adapter=base) >= 4
    assert server.metric("loraserve_kv_blocks_total") == 64
    assert server.metric("loraserve_base_weight_bytes") > 0 and server.metric("loraserve_adapter_slot_bytes") > 0
