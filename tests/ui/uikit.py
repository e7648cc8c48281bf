"""Helpers for the console tests: a live server on a free loopback port (a thread), and
the headless Chromium that drives it.

(tests/api/livekit.py is not importable from this folder: its directory is on sys.path
only when tests there run, so the little server helper is repeated here.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time

import uvicorn

from loraserve.api import ServerSettings, build_app

# What the notes on Debian's chromium ask for in a sandboxed, offline test run; Playwright
# adds a fresh --user-data-dir of its own for every launch.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync"]
APT_TIMEOUT_S = 900


@contextlib.contextmanager
def live_server(engine, settings: ServerSettings):
    """The app on 127.0.0.1:<free port>; yields it with `.url` set."""
    app = build_app(engine, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    app.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield app
    finally:
        if app.state.ctx.jobs is not None:
            app.state.ctx.jobs.shutdown()
        server.should_exit = True
        thread.join(15)
        sock.close()


def find_or_install_chromium() -> str:
    """The chromium binary; installed with apt-get (Debian's package) when missing.
    Raises RuntimeError saying why when it cannot be had."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("chromium is not installed and this machine has no apt-get to install it; "
                           "install a Chromium build and put `chromium` on PATH")
    if os.geteuid() != 0:
        raise RuntimeError("chromium is not installed and the tests are not running as root, so they cannot "
                           "`apt-get install -y chromium`; install it once as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock_wait = ["-o", "DPkg::Lock::Timeout=600"]   # another apt-get on the machine: wait for it
    for command in (["apt-get", *lock_wait, "update", "-q"],
                    ["apt-get", *lock_wait, "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`{' '.join(command)}` did not finish within {APT_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}), so there is no browser "
                               f"for the console tests:\n{(done.stderr or done.stdout)[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        raise RuntimeError("apt-get installed the chromium package but no `chromium` binary is on PATH")
    return found
