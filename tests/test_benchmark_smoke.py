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
    ("benchmarks.lora_cpu", ["### decode shapes", "### rank-aware cost", "### int8 slots"]),
    ("benchmarks.cpu_step", ["matmul peak", "| step / floor |"]),
    ("benchmarks.matmul_cpu", ["| bfloat16 | M |", "| float32 | M |"]),
    ("benchmarks.rms_norm_cpu", ["| bfloat16 | 8 |", "| float32 | 8 |"]),
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


def test_vllm_peer_benchmark_says_what_it_needs():
    """Without a vLLM CPU venv the peer benchmark stops at once and says how to make one."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_PYTHON"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.vs_vllm_cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--vllm-python" in proc.stderr and "run_peer_bench.sh setup" in proc.stderr


def test_vllm_model_dir_drops_only_the_gguf_quantization(tmp_path):
    import json

    from benchmarks.vs_vllm_cpu import plain_model_dir

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    (src / "model.safetensors").write_bytes(b"weights")
    assert plain_model_dir(str(src), str(tmp_path / "dst")) == str(tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == {"model_type": "llama"}
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == b"weights"
