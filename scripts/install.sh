#!/usr/bin/env bash
# Create .venv (or $VENV) and install vrpo_fast with its test tools and the integrations the
# tests cover (`.[dev,trl,lora]`).
#
#   bash scripts/install.sh            # the locked set: the exact versions CI passed with
#   bash scripts/install.sh --newest   # the newest releases setup.py allows (no lock)
#
# The lock (requirements/lock.txt, written by scripts/lock.sh) is a pip constraints file: it
# fixes the version of every package it names and installs nothing by itself. On a machine with
# an NVIDIA GPU its torch / triton / CUDA lines are left out (the CUDA build of torch pins its
# own triton); on one without, the CPU build of torch 2.13.0 is installed first, so pip never
# pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
newest=0
for arg in "$@"; do
  case "$arg" in
    --newest) newest=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --newest, or none for the locked set)" >&2
       exit 2 ;;
  esac
done
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
constraints=()
if [ "$newest" = 0 ]; then
  [ -f "$LOCK" ] || { echo "install.sh: $LOCK is missing (bash scripts/lock.sh writes it)" >&2; exit 1; }
  lock=$LOCK
  if [ "$gpu" = 1 ]; then
    lock="$(mktemp)"
    grep -viE '^(torch|triton|nvidia-|cuda-)' "$LOCK" >"$lock"
  fi
  constraints=(-c "$lock")
fi
if [ "$gpu" = 0 ]; then
  pip install --quiet "torch==2.13.0" || pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
pip install --quiet "${constraints[@]}" -e ".[dev,trl,lora]"
set_name=$([ "$newest" = 1 ] && echo "newest allowed releases" || echo "locked set ($LOCK)")
echo "installed ($set_name): $("$VENV/bin/python" -c 'import torch, transformers, vrpo_fast; print("vrpo_fast", vrpo_fast.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
