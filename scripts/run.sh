#!/usr/bin/env bash
# The main job on its embedded default: 20 training steps of a small GPT-2 MoE on the
# byte corpus of Python's own sources; all local GPUs with NCCL, else 2 CPU ranks with gloo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
lancet train --model gpt2_moe_nl2_m64_nh4_sl32_b4 --gate switch --steps 20 --data stdlib "$@"
