#!/usr/bin/env bash
# The measured results in docs/results.md: profile, comm curves, plans, side-by-side benches in two
# network regimes, HTA cross-check, and per-gate training runs. Everything lands in $OUT/results.tar.gz.
source scripts/gpu/env.sh
M=${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}
DISPATCH_ARGS=${DISPATCH:+--dispatch $DISPATCH}  # padded or ragged for the switch runs (default: padded)
R=/tmp/results; mkdir -p $R
step() { echo "### $(date +%T) $*"; "$@" > >(tee -a $R/log.txt | tail -${TAIL:-30}) 2>&1; }
step $LANCET profile --model $M --dtype bf16 --gate switch $DISPATCH_ARGS --out $R/profile.json --passes 3 --reps 5
for NET in nvlink ib100; do
    step $LANCET profile-comm --network $NET --out $R/comm_$NET.json --reps 5
    step $LANCET optimize --profile $R/profile.json --comm $R/comm_$NET.json --out $R/plan_$NET.json --trace-dir $R/pred_$NET
    step $LANCET bench --model $M --dtype bf16 --gate switch $DISPATCH_ARGS --network $NET --variants eager,captured,lancet-dw \
        --plan $R/plan_$NET.json --steps 20 --warmup 5 --profile-steps 3 --json $R/bench_$NET.json --trace-dir $R/traces_$NET
    python3 - $R/traces_$NET <<'PY' 2>&1 | grep -E "^(variant|eager|captured|lancet)" | tee -a $R/log.txt
import sys
from lancet.measure.trace_metrics import hta_exposed_comm_ms, summarize, load_trace
base = sys.argv[1]
print("variant ours_exposed_ms hta_exposed_ms step_ms")
for v in ("eager", "captured", "lancet-dw"):
    s = summarize(load_trace(f"{base}/{v}/rank0.json"))
    print(v, round(s["exposed_comm_ms"], 3), round(hta_exposed_comm_ms(f"{base}/{v}"), 3), round(s["step_ms"], 3))
PY
    rm -f $R/traces_$NET/*/rank[1-9]*.json; gzip -q $R/traces_$NET/*/rank0.json
done
for G in switch batch_prioritized topk; do
    TAIL=3 step $LANCET train --model $M --dtype bf16 --gate $G --steps 20 --metrics-jsonl $R/train_$G.jsonl
done
tar -czf $OUT/results.tar.gz -C /tmp results
ls -la $OUT
