#!/usr/bin/env bash
# Create .venv (if missing) with torch and lancet installed. Sourced by run.sh and test.sh.
# TORCH_SPEC picks the torch build: the default CPU build is small; set e.g.
# TORCH_SPEC="torch>=2.11" on a GPU machine to take the CUDA build from PyPI.
# Nothing is installed again while pyproject.toml and TORCH_SPEC stay the same (.venv/.lancet-installed
# holds their digest); lancet itself is installed editable, so source changes need no reinstall.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
source .venv/bin/activate
stamp=".venv/.lancet-installed"
wanted="$(cat pyproject.toml; echo "${TORCH_SPEC:-torch==2.13.0}")"
wanted="$(printf '%s' "$wanted" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    if ! python -c "import torch" 2>/dev/null; then
        echo "setup: installing ${TORCH_SPEC:-torch==2.13.0} (first time: a few minutes)" >&2
        python -m pip install -q --upgrade pip
        python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "setup: installing lancet and its dependencies into .venv" >&2
    python -m pip install -q -e '.[dev]'
    echo "$wanted" > "$stamp"
fi
