#!/usr/bin/env bash
# Quick end-to-end pass over every command on the GPUs present (logs under $OUT).
source scripts/gpu/env.sh
M=gpt2_moe_nl12_m768_nh16_sl512_b48
run() { echo "### $*"; timeout 240 "$@" 2>&1 | tail -25; echo "### rc=${PIPESTATUS[0]}"; }
python3 -c "import torch; print(torch.__version__, torch.cuda.device_count(), torch.cuda.get_device_name())"
run python3 scripts/gpu/check_ops.py
run $LANCET train --model gpt2_moe_nl2_m64_nh4_sl32_b4 --steps 4 --dtype bf16 --mode eager
run $LANCET train --model gpt2_moe_nl2_m64_nh4_sl32_b4 --steps 4 --dtype bf16 --mode captured
run $LANCET inspect --model $M --dtype bf16 --json $OUT/inspect.json
run $LANCET profile --model $M --dtype bf16 --out $OUT/profile.json --passes 2 --reps 3
run $LANCET profile-comm --out $OUT/comm.json --reps 3
run $LANCET optimize --profile $OUT/profile.json --comm $OUT/comm.json --out $OUT/plan.json --trace-dir $OUT
run $LANCET bench --model $M --dtype bf16 --variants eager,captured,lancet-dw --plan $OUT/plan.json \
    --steps 8 --warmup 3 --profile-steps 2 --json $OUT/bench.json --trace-dir /tmp/traces
python3 -c "
from lancet.measure.trace_metrics import hta_exposed_comm_ms, summarize, load_trace
for v in ('eager','captured','lancet-dw'):
    print(v, 'ours', summarize(load_trace('/tmp/traces/%s/rank0.json' % v))['exposed_comm_ms'], 'hta', hta_exposed_comm_ms('/tmp/traces/%s' % v))
" 2>&1 | grep -v Parsed | tail -8
