"""The kernel benchmarks run end to end at tiny shapes (their `--smoke` mode), so a
change to the kernels' contract cannot leave them broken until the next GPU session.
Nothing is timed here: the scripts' numbers at these shapes mean nothing."""

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("script, sections", [
    ("lora_cpu.py", ["### decode shapes", "### rank-aware cost"]),
    ("kernels.py", ["## LoRA decode", "## rank-aware LoRA", "## paged attention decode", "decode step"]),
])
def test_smoke_run(script, sections):
    if script == "kernels.py":
        pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for section in sections:
        assert section in proc.stdout, (section, proc.stdout[-2000:])
