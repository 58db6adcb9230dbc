#!/usr/bin/env bash
# The estimate of a partitioned step against a measured profile of that step (docs/results.md, runs 4-6):
# profile the captured step and the tutel-d2 step, compare node by node.
#   bash scripts/gpu/estimate_check.sh COMM_JSON    (comm curves, e.g. from a `lancet experiment run` folder)
set -euo pipefail
source scripts/gpu/env.sh
M=${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}
G=${GATE:-switch}
$LANCET profile --model $M --dtype bf16 --gate $G --out $OUT/profile.json --passes 3 --reps 5
$LANCET profile --model $M --dtype bf16 --gate $G --out $OUT/profile_d2.json --passes 3 --reps 5 --tutel 2
python3 -m lancet.app.estimate_check --profile $OUT/profile.json --tutel-profile $OUT/profile_d2.json --comm "$1" \
    --json $OUT/estimate_check.json
