#!/usr/bin/env bash
# Make a separate virtualenv holding mergekit (a peer to compare with; never a mergejax dependency).
# Usage: bash experiments/peers/mergekit_venv.sh [VENV_DIR]   (default: .venv-mergekit)
# torch is installed first from the local CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
VENV="${1:-.venv-mergekit}"
PY="${PYTHON:-python3.11}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-0.1.5}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
if ls "$TORCH_WHEEL_DIR"/torch-2.13.0*.whl >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q "$TORCH_WHEEL_DIR"/torch-2.13.0*.whl
else
  "$VENV/bin/pip" install -q torch==2.13.0
fi
"$VENV/bin/pip" install -q "mergekit==${MERGEKIT_VERSION}" "torch==2.13.0"
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit ${MERGEKIT_VERSION} ready: $VENV/bin/mergekit-yaml"
