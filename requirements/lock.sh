#!/usr/bin/env bash
# Regenerates the two lock files from pyproject.toml's ranges, with pip-tools' pip-compile:
#   requirements/serve.txt  every package `loraserve serve` needs, direct and transitive
#   requirements/test.txt   the same plus the test tools (the `test` and `triton` extras)
# install.sh installs through them. torch is compiled in at 2.13.0 (constraints.in) but
# left out of the files: install.sh installs its CPU build first.
# Run from anywhere, in a venv with pip-tools (`pip install pip-tools`): bash requirements/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COMPILE=(pip-compile --quiet --strip-extras --no-emit-find-links --no-emit-index-url --unsafe-package torch
         --constraint requirements/constraints.in --upgrade)
"${COMPILE[@]}" --extra test,triton --output-file requirements/test.txt pyproject.toml
# serve is compiled under test's pins, so the two never disagree on a version
"${COMPILE[@]}" --constraint requirements/test.txt --output-file requirements/serve.txt pyproject.toml
