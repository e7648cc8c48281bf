"""`python -m loraserve` is the `loraserve` command: same help, same errors, same exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(sys.executable), "loraserve")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["finetune", "--help"], ["no-such-command"]])
def test_module_matches_script(args):
    assert os.path.exists(SCRIPT), f"the console script is not installed at {SCRIPT}; run install.sh"
    module, script = run([sys.executable, "-m", "loraserve", *args]), run([SCRIPT, *args])
    assert module.returncode == script.returncode
    assert module.stdout == script.stdout and module.stderr == script.stderr
    if args == ["--help"]:
        assert module.returncode == 0 and module.stdout.startswith("usage: loraserve")
        for command in ("generate", "serve", "finetune", "keys"):
            assert command in module.stdout
    if args == ["no-such-command"]:
        assert module.returncode == 2 and "invalid choice" in module.stderr
