#!/usr/bin/env bash
# Set up everything polyalign needs in ./.venv (idempotent: a second run only checks).
# Pins the CPU build of torch; see README "GPU machines" for a CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.polyalign-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${POLYALIGN_TORCH:-2.13.0}"
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "$want" > "$stamp"
