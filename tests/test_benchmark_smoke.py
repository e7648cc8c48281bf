"""The kernel benchmarks run end to end at tiny shapes (their `--smoke` mode), so a
change to the kernels' contract cannot leave them broken until the next GPU session.
Nothing is timed here: the scripts' numbers at these shapes mean nothing. Each runs as
the README says, `python -m benchmarks.<name>` from the repository root."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module, sections", [
    ("benchmarks.lora_cpu", ["### decode shapes", "### rank-aware cost"]),
    ("benchmarks.cpu_step", ["matmul peak", "| step / floor |"]),
    ("benchmarks.kernels", ["## LoRA decode", "## rank-aware LoRA", "## paged attention decode", "decode step"]),
])
def test_smoke_run(module, sections):
    if module == "benchmarks.kernels":
        pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", module, "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for section in sections:
        assert section in proc.stdout, (section, proc.stdout[-2000:])
