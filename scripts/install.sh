#!/usr/bin/env bash
# Create .venv (or $VENV) and install vrpo_fast with its test tools.
# CPU torch 2.13.0 is installed first when no NVIDIA GPU is present, so pip never pulls the
# multi-GB CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  pip install --quiet "torch==2.13.0" || pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
pip install --quiet -e ".[dev,trl,lora]"
echo "installed: $("$VENV/bin/python" -c 'import torch, vrpo_fast; print("vrpo_fast", vrpo_fast.__version__, "torch", torch.__version__)')"
