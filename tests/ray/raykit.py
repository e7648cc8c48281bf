"""Helpers of the Ray tests (fixtures live in conftest.py; a conftest module name is shared
by every test folder, so tests import from here)."""

from __future__ import annotations

import socket
import time

import httpx

NUM_REPLICAS = 2
MAX_LORAS = 4             # per replica: 6 adapters fit in 2 x 4 slots with room to spare
START_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_config(base_dir: str, adapter_dir: str):
    from loraserve import EngineConfig

    return EngineConfig(model=base_dir, dtype="float32", max_loras=MAX_LORAS, max_lora_rank=64, max_model_len=512,
                        adapter_dir=adapter_dir, num_kv_blocks=256, max_num_seqs=16)


class Cluster:
    def __init__(self, url: str, adapters: list[str]):
        self.url = url
        self.adapters = adapters

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def wait_healthy(cluster: Cluster, num_replicas: int, timeout: float = START_TIMEOUT_S) -> None:
    """Until /health answers 200 and every replica has reported to the board."""
    deadline = time.monotonic() + timeout
    last = None
    with cluster.client(timeout=10) as c:
        while time.monotonic() < deadline:
            try:
                if c.get("/health").status_code == 200:
                    up = replicas_up(c)
                    if len(up) >= num_replicas:
                        return
                    last = f"{len(up)} replicas up"
                else:
                    last = "health not 200"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.5)
    raise RuntimeError(f"the Ray Serve app did not become healthy in {timeout} s ({last})")


def replicas_up(client: httpx.Client) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return [s.labels["replica"] for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "loraserve_replica_up"]
