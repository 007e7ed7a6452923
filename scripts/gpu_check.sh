#!/usr/bin/env bash
# The first checks on a GPU (docs/gpu.md): installs the CUDA extras, then runs scripts/gpu_check.py
# (MSD steps with HF and vLLM sampling, fused-head memory at response 512, hf vs vllm evaluation),
# then the test suite's CUDA-only tests. At most ~8 minutes on one GPU. Stops with a line saying why
# on a machine without CUDA (exit 3).
#
#   bash scripts/gpu_check.sh [gpu_check.py options]      # OUT=folder for results (default runs/gpu_check)
#
# Packages: from the registry (`pip install -e '.[vllm]'`); on a machine with no registry, WHEELS=DIR
# installs the wheels in DIR offline instead (docs/gpu.md says how to prepare them).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# No CUDA: nothing to install; gpu_check.py says why it stops (exit 3).
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null || {
  "$PY" scripts/gpu_check.py --out "$OUT" "$@"; exit $?; }
if [ -n "${WHEELS:-}" ]; then        # a machine with no registry: wheels carried in $WHEELS (docs/gpu.md)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/polyalign-site "$WHEELS"/*.whl \
    || { echo "gpu_check: installing the wheels in $WHEELS failed"; exit 1; }
  export PYTHONPATH="/tmp/polyalign-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  "$PY" -m pip install -q -e '.[vllm]' || { echo "gpu_check: the vllm extra did not install; continuing without it"
                                            "$PY" -m pip install -q -e . || exit 1; }
fi
"$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
# The suite's CUDA branches (skipped on CPU): placement, dtype, judge inputs following the model.
"$PY" -m pytest -q -x -p no:cacheprovider -k "gpu or cuda" -m "not real_model and not distributed" tests 2>&1 \
  | tail -15 | tee "$OUT/pytest_cuda.log"
