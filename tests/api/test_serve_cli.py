"""`loraserve serve` as a real process: --help explains every flag, start-up logs say where
and what it serves, an exposed host without keys is refused, and SIGTERM drains: the
running request finishes, new connections are refused, and the process exits 0."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from loraserve.api.cli import build_parser

CLI = [sys.executable, "-m", "loraserve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_explains_every_flag():
    out = subprocess.run(CLI + ["serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    flags = [w.split("=")[0].rstrip(",") for w in out.stdout.split() if w.startswith("--")]
    for flag in ("--host", "--port", "--adapter", "--adapter-dir", "--api-keys", "--max-loras", "--max-cpu-loras",
                 "--max-lora-rank", "--max-num-seqs", "--max-queue", "--max-adapter-bytes", "--model",
                 "--allow-unauthenticated", "--drain-timeout"):
        assert flag in flags, flag
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [a.option_strings for a in subcommands.choices["serve"]._actions
                    if a.help in (None, "", argparse.SUPPRESS)]
    assert not undocumented


def test_exposed_host_without_keys_is_refused_before_loading():
    out = subprocess.run(CLI + ["serve", "--host", "0.0.0.0", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-keys" in out.stderr and "--allow-unauthenticated" in out.stderr


@pytest.fixture
def serve_process(tiny_llama, tmp_path):
    base_dir, adapters = tiny_llama
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(CLI + ["serve", "--model", base_dir, "--port", str(port), "--dtype", "float32",
                                   "--max-model-len", "256", "--num-kv-blocks", "64", "--max-lora-rank", "64",
                                   "--adapter-dir", str(tmp_path / "store"), "--adapter", f"tone={adapters['r4']}",
                                   "--drain-timeout", "20"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def test_startup_logs_and_sigterm_drain(serve_process):
    proc, url, log_path = serve_process
    text = log_path.read_text()
    for words in (f"listening on {url}", "KV blocks", "adapter slots", "auth: OPEN", "adapter tone: registered"):
        assert words in text, text
    body = {"model": "tone", "prompt": "drain me", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]", "the running request was cut off"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0, log_path.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
    assert "draining" in log_path.read_text()
