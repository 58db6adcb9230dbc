#!/usr/bin/env bash
# The test suite on CPU (multi-rank tests use gloo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q "$@"
