"""A rank whose cudagraph executor is still referenced at its end exits (its graphs go before the NCCL group)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).parents[2] / "scripts" / "gpu" / "exit_probe.py"


def test_a_rank_holding_captured_graphs_exits():
    env = {**os.environ, "MASTER_PORT": "29523"}
    done = subprocess.run([sys.executable, str(PROBE), "keep"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "process group destroyed" in done.stdout
