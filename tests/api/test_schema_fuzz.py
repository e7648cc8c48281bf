"""FastAPI's OpenAPI schema, served at /openapi.json, fuzzed with schemathesis for a bounded
number of examples per operation: no input may cause a 5xx, and every error answers in
OpenAI's error shape."""

from __future__ import annotations

import huggingface_hub
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from livekit import live_server, tiny_engine

from loraserve.api import ServerSettings

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama, tmp_path_factory):
    base_dir, _ = tiny_llama
    engine = tiny_engine(base_dir, str(tmp_path_factory.mktemp("fuzz_store")), max_model_len=64)
    hub = huggingface_hub.snapshot_download

    def offline(*args, **kwargs):
        raise OSError("no network in tests")

    huggingface_hub.snapshot_download = offline   # a generated hf:// source must not reach out
    try:
        with live_server(engine, ServerSettings(max_adapter_bytes=1 << 20)) as server:
            yield server
    finally:
        huggingface_hub.snapshot_download = hub
        engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def test_openapi_schema_is_served(fuzz_server):
    with fuzz_server.client() as c:
        spec = c.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/v1/adapters/{ref}",
                 "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health", "/metrics"):
        assert path in spec["paths"], path


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case):
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error
