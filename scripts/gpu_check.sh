#!/usr/bin/env bash
# The GPU proof in one call (vrpo_fast/bench/gpu_check.py says what each section measures):
#
#   scripts/gpu_check.sh OUT                 # on one H100 / H200: at most ~8 minutes
#   scripts/gpu_check.sh OUT --dry-run       # the same sections at tiny shapes on the CPU (CI)
#   scripts/gpu_check.sh OUT --only sweep_a,step_m8 [--budget-s 440] [--lora-layers 8]
#
# Writes OUT/results.json, OUT/results.md (every row with its status, the device, the commit,
# the versions, the targets met or not) and OUT/gpu_check.log. On a GPU machine that cannot
# reach a registry, the wheels its image lacks travel in .whl/ (fetched beforehand where a
# registry is reachable, e.g. `pip download -d .whl liger-kernel cut-cross-entropy`) and are
# installed first; the checkout itself is installed
# into the same folder when `vrpo_fast.kernels` does not import from it as it is. A copy of the
# tree without .git has no commit: pass it as VRPO_BENCH_COMMIT=$(git rev-parse --short HEAD).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: scripts/gpu_check.sh OUT [--dry-run] [--only SECTION,...] [--budget-s S]" >&2
  exit 2
fi
out=$1
shift
case $out in /*) ;; *) out=$PWD/$out ;; esac
cd "$root" || exit 1
py=${PYTHON:-python3}
if [ -z "${VRPO_BENCH_COMMIT:-}" ] && git rev-parse --short HEAD >/dev/null 2>&1; then
  dirty=$(git status --porcelain --untracked-files=no 2>/dev/null)
  export VRPO_BENCH_COMMIT="$(git rev-parse --short HEAD)${dirty:+-dirty}"
fi
site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
if ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site" >&2
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || echo "gpu_check: some wheels did not install" >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# -P: the checkout's root is not put on sys.path (its folders must not shadow installed
# packages); the package comes from an install, or from the checkout through PYTHONPATH.
if ! "$py" -P -c 'import vrpo_fast.kernels' >/dev/null 2>&1; then
  if PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" -P -c 'import vrpo_fast.kernels' \
      >/dev/null 2>&1; then
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: installing the checkout into $site" >&2
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
      --target "$site" "$root" || { echo "gpu_check: cannot install $root" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
exec "$py" -P -m vrpo_fast.bench.gpu_check "$out" --configs "$root/configs" "$@"
