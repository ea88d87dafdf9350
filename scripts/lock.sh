#!/usr/bin/env bash
# Write requirements/lock.txt: the exact versions of an environment the suite passed in.
#
#   bash scripts/lock.sh                  # fresh .venv-lock with the newest allowed releases
#   bash scripts/lock.sh .venv-ci-newest  # freeze an environment that exists (CI's newest set)
#
# CI runs the suite on the locked set and on the newest set; when the newest passes, this one
# command refreshes the lock (then run the suite once more on it, and commit the file). torch is
# written without its build tag (`torch==2.13.0`, which the CPU and CUDA builds both satisfy).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
venv=${1:-}
if [ -z "$venv" ]; then
  venv=.venv-lock
  rm -rf "$venv"
  VENV=$venv bash scripts/install.sh --newest
fi
[ -x "$venv/bin/python" ] || { echo "lock.sh: $venv is not a virtual environment" >&2; exit 2; }
py=$("$venv/bin/python" -c 'import platform, sys; print(f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}")')
mkdir -p "$(dirname "$LOCK")"
tmp="$LOCK.tmp"
{
  echo "# The exact versions the test suite passed with: a pip constraints file, used by"
  echo "# scripts/install.sh unless it is given --newest. Written by scripts/lock.sh on"
  echo "# $(date -u +%Y-%m-%d) from an environment on $py."
  "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} >"$tmp"
mv "$tmp" "$LOCK"
echo "lock.sh: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages) from $venv"
