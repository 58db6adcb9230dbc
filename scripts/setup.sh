#!/usr/bin/env bash
# Create .venv (if missing) with torch and lancet installed. Sourced by run.sh and test.sh.
# TORCH_SPEC picks the torch build: the default CPU build is small; set e.g.
# TORCH_SPEC="torch>=2.11" on a GPU machine to take the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e '.[dev]'
