#!/usr/bin/env bash
# The test suite on CPU (multi-rank tests use gloo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# Holistic Trace Analysis, for the overlap cross-check test. Its declared requirements include
# jupyterlab, which the analysis does not import; install the library and what it imports.
if ! python -c "import hta.trace_analysis" 2>/dev/null; then
    python -m pip install -q pandas plotly pydot psutil pyyaml networkx
    python -m pip install -q --no-deps "HolisticTraceAnalysis==0.5.0"
fi
# transformers, for the HuggingFace MoE model tests (lancet.integrations.hf).
if ! python -c "import transformers" 2>/dev/null; then
    python -m pip install -q "transformers==5.24.0"
fi
python -m pytest -q "$@"
