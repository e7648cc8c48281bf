"""A local Ray instance (loopback, few CPUs) running the loraserve Ray Serve app: two
engine replicas of the tiny random llama, six adapters in one shared store; and a
single-node engine on the same weights to compare answers with.

Every wait is bounded; Serve and Ray always shut down, even when a test fails.
"""

from __future__ import annotations

import os

import pytest
import torch
from raykit import NUM_REPLICAS, Cluster, engine_config, free_port, wait_healthy

EXTRA_ADAPTERS = {"a5": 11, "a6": 12, "fresh": 13}   # name -> seed, besides the four of ADAPTER_MIX


@pytest.fixture(scope="session")
def ray_adapters(tiny_models, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(base dir, {name: peft dir}): the four of ADAPTER_MIX plus three more of rank 8."""
    from lorakit import ALL_MODULES, save_peft_adapter
    from transformers import AutoModelForCausalLM

    base_dir, adapters = tiny_models["llama"]
    root = tmp_path_factory.mktemp("ray_adapters")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    extra = {name: save_peft_adapter(base, str(root / name), 8, 16, False, ALL_MODULES, seed)
             for name, seed in EXTRA_ADAPTERS.items()}
    return base_dir, {**adapters, **extra}


@pytest.fixture(scope="module")
def reference(ray_adapters, tmp_path_factory):
    """A single-node server on the same weights, adapters registered under the same names."""
    from fastapi.testclient import TestClient

    from loraserve.api import build_app
    from loraserve.async_engine import AsyncEngine

    base_dir, adapters = ray_adapters
    engine = AsyncEngine(engine_config(base_dir, str(tmp_path_factory.mktemp("reference_store"))))
    for name, path in adapters.items():
        engine.engine.store.register_dir("default", name, path, shared=True)
    try:
        with TestClient(build_app(engine)) as client:
            yield client
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_adapters, tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from loraserve.adapters import AdapterStore, BaseModelSpec
    from loraserve.api.ray_deploy import APP_NAME, ray_app
    from loraserve.model.loader import load_config

    base_dir, adapters = ray_adapters
    store_dir = str(tmp_path_factory.mktemp("shared_store"))
    config = engine_config(base_dir, store_dir)
    spec = BaseModelSpec.from_hf_config(load_config(base_dir), config.max_lora_rank, os.path.basename(base_dir))
    store = AdapterStore(store_dir, spec)
    served = [name for name in adapters if name != "fresh"]   # "fresh" is uploaded by a test
    for name in served:
        store.register_dir("default", name, adapters[name], shared=True)
    del store                                                  # the ingress is the store's one writer
    port = free_port()
    ray.init(address="local", num_cpus=NUM_REPLICAS + 1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(config, num_replicas=NUM_REPLICAS), name=APP_NAME, route_prefix="/",
                  blocking=False)
        cluster = Cluster(f"http://127.0.0.1:{port}", served)
        wait_healthy(cluster, NUM_REPLICAS)
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()


