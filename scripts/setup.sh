#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with torch first (CPU 2.13.0 by default), then sevenpoint.
#   TORCH_SPEC="torch==2.5.1" scripts/setup.sh     # e.g. a CUDA build on a GPU machine
#   VENV=/path/to/venv scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
# torch first: a bare "torch" requirement in a fresh venv would pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v -i warning || true
"$VENV/bin/python" -m pip install -q -e ".[test]" 2>&1 | grep -v -i warning || true
"$VENV/bin/python" -c "import torch, sevenpoint; print('sevenpoint', sevenpoint.__version__, 'torch', torch.__version__)"
