"""The Ray Serve scale-out on a local Ray instance: two engine replicas of a tiny random
llama behind one OpenAI endpoint. Repeated requests for an adapter land on the replica
that already holds it, answers equal the single-node server's, an upload is usable
through the cluster and a delete reaches the replicas, and killing one replica fails
only its own requests (with a 5xx the client can retry) while the service keeps answering."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import pytest
from raykit import NUM_REPLICAS, replicas_up

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")

REPLICA_HEADER = "x-loraserve-replica"
PROMPT = "the quick brown fox"


def complete(c: httpx.Client, model: str, max_tokens: int = 6, **extra) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                           "temperature": 0, "ignore_eos": True, **extra})


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_answers_equal_the_single_node_server(cluster, reference):
    with cluster.client() as c:
        base = c.get("/v1/models").json()["data"][0]["id"]
        for model in [base, *cluster.adapters]:
            assert text_of(complete(c, model)) == text_of(complete(reference, model)), model
        # streamed through Ray Serve's streaming handle: the same text, chunk by chunk
        model = cluster.adapters[0]
        body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
        assert streamed == text_of(complete(reference, model))


def test_requests_stick_to_the_replica_holding_their_adapter(cluster):
    with cluster.client() as c:
        for _ in range(2):                    # warm-up: first loads, and Ray learns who holds what
            for model in cluster.adapters:
                assert complete(c, model, max_tokens=2).status_code == 200
        # Ray learns who holds what from the replicas' reports: wait, bounded, until a round
        # of requests lands where the round before it did
        deadline = time.monotonic() + 60
        placed = {m: complete(c, m, max_tokens=2).headers[REPLICA_HEADER] for m in cluster.adapters}
        while time.monotonic() < deadline:
            again = {m: complete(c, m, max_tokens=2).headers[REPLICA_HEADER] for m in cluster.adapters}
            if again == placed:
                break
            placed = again
            time.sleep(0.25)
        last: dict[str, str] = {}
        hits = total = 0
        seen = Counter()
        for _ in range(5):
            for model in cluster.adapters:
                r = complete(c, model, max_tokens=2)
                assert r.status_code == 200, r.text
                replica = r.headers[REPLICA_HEADER]
                seen[replica] += 1
                if model in last:
                    total += 1
                    hits += replica == last[model]
                last[model] = replica
        assert len(seen) == NUM_REPLICAS, f"every replica serves some adapters: {seen}"
        assert hits / total > 0.8, f"affinity {hits}/{total}"


def test_upload_is_usable_through_the_cluster_and_delete_reaches_replicas(cluster, reference, ray_adapters):
    _, adapters = ray_adapters
    folder = adapters["fresh"]
    with open(os.path.join(folder, "adapter_config.json"), "rb") as f:
        config = f.read()
    with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as f:
        weights = f.read()
    with cluster.client() as c:
        r = c.post("/v1/adapters", data={"name": "fresh"},
                   files={"adapter_config": ("adapter_config.json", config),
                          "adapter_model": ("adapter_model.safetensors", weights)})
        assert r.status_code == 201, r.text
        assert text_of(complete(c, "fresh")) == text_of(complete(reference, "fresh"))
        # tiers come from the replicas' reports, at most a second or so behind
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/v1/adapters/fresh").json()["tier"] == "disk":
            time.sleep(0.25)
        assert c.get("/v1/adapters/fresh").json()["tier"] in ("device", "cpu")
        assert c.delete("/v1/adapters/fresh").status_code == 200
        assert complete(c, "fresh").status_code == 404
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "default/fresh@1" in c.get("/metrics").text:
            time.sleep(0.25)
        assert "default/fresh@1" not in c.get("/metrics").text, "every replica dropped the deleted adapter"


def test_killing_a_replica_fails_only_its_requests_and_the_service_goes_on(cluster):
    model = cluster.adapters[0]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with cluster.client() as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            victim = r.headers[REPLICA_HEADER]
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))   # it is running on the victim
            ray.kill(replica_actor(victim), no_restart=True)
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
        assert errors and errors[0]["type"] in ("server_error", "service_unavailable"), events[-3:]
        assert "retry" in errors[0]["message"] or "Ray Serve restarts" in errors[0]["message"]
        # the other replica answers at once; the killed one is replaced by Ray Serve
        answered = 0
        deadline = time.monotonic() + 60
        while answered < 2 * len(cluster.adapters) and time.monotonic() < deadline:
            r = complete(c, cluster.adapters[answered % len(cluster.adapters)], max_tokens=2)
            assert r.status_code in (200, 503), r.text   # a 503 only for a request routed to the dead one
            answered += r.status_code == 200
        assert answered == 2 * len(cluster.adapters)
    # Ray Serve replaces the killed replica: two replicas report again, the victim not among them
    deadline = time.monotonic() + 120
    with cluster.client() as c:
        up = replicas_up(c)
        while (victim in up or len(up) < NUM_REPLICAS) and time.monotonic() < deadline:
            time.sleep(1.0)
            up = replicas_up(c)
    assert victim not in up and len(up) == NUM_REPLICAS, up


def replica_actor(replica_id: str):
    from ray.util import list_named_actors

    for actor in list_named_actors(all_namespaces=True):
        if "LoraEngine" in actor["name"] and replica_id in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no actor for replica {replica_id}")


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}


def test_structured_outputs_and_prompt_logprobs_run_on_the_replicas(cluster, reference):
    """A grammar's compiled matcher cannot be pickled: the replica compiles the grammar
    again from its text, and the answer equals the single-node server's and fits the
    schema. Teacher-forced prompt scoring (echo with logprobs) crosses too."""
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}
    body = {"messages": [{"role": "user", "content": "a number"}], "max_tokens": 12, "temperature": 0,
            "response_format": rf}
    scored = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    with cluster.client() as c:
        for model in [c.get("/v1/models").json()["data"][0]["id"], cluster.adapters[0]]:
            ours = c.post("/v1/chat/completions", json={"model": model, **body})
            assert ours.status_code == 200, ours.text
            theirs = reference.post("/v1/chat/completions", json={"model": model, **body}).json()
            answer = ours.json()["choices"][0]["message"]["content"]
            assert answer == theirs["choices"][0]["message"]["content"], model
            if ours.json()["choices"][0]["finish_reason"] == "stop":
                assert isinstance(json.loads(answer)["n"], int)
            echo = c.post("/v1/completions", json={"model": model, **scored})
            assert echo.status_code == 200, echo.text
            want = reference.post("/v1/completions", json={"model": model, **scored}).json()
            got_lps = echo.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert got_lps[0] is None and got_lps[1:] == pytest.approx(want["choices"][0]["logprobs"]["token_logprobs"][1:],
                                                                        abs=1e-4)
