#!/usr/bin/env bash
# Builds the separate virtualenv of the peer libraries that experiments/bench_peers.py times against mergejax.
# The peers are never dependencies of mergejax: they live only in this venv, passed as --peers-python.
#
#   bash experiments/peers/setup_venv.sh [VENV_DIR]        # default: .venv-peers
#   python experiments/bench_peers.py --peers-python .venv-peers/bin/python
#
# torch first, from the local CPU wheel (/opt/wheels) when present, so pip never pulls a CUDA build.
set -euo pipefail
VENV="${1:-.venv-peers}"
PY="${PYTHON:-python3}"
FIND=""
[ -d /opt/wheels ] && FIND="--find-links /opt/wheels"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q $FIND torch==2.13.0
"$VENV/bin/pip" install -q $FIND peft==0.21.2 mergekit==0.1.5 fusion-bench==0.2.33 numpy torch==2.13.0
"$VENV/bin/python" -c "import torch, peft, mergekit, fusion_bench; print('peers venv ready:', torch.__version__, peft.__version__)"
