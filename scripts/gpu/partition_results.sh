#!/usr/bin/env bash
# Side-by-side benches of every variant (issue: partition + pipelining) on the GPUs present.
# Usage: bash scripts/gpu/partition_results.sh 1   (profile, comm curves, nvlink plan and bench)
#        bash scripts/gpu/partition_results.sh 2   (ib100 and ib400 plans and benches; needs part 1's files in .results)
# Everything lands in $OUT/results_<part>.tar.gz.
set -u
source scripts/gpu/env.sh
PART=${1:-1}
M=${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}
G=${GATE:-switch}
R=/tmp/results_$PART; mkdir -p $R
VARIANTS=${VARIANTS:-eager,captured,tutel-d2,tutel-d4,tutel-d8,lancet-dw,lancet-part,lancet}
step() { echo "### $(date +%T) $*"; "$@" > >(tee -a $R/log.txt | grep -v "USDT\|Warning\|warn" | tail -${TAIL:-25}) 2>&1; }
bench() {
    local net=$1
    step $LANCET optimize --profile $P/profile.json --comm $P/comm_$net.json --out $R/plan_$net.json --trace-dir $R/pred_$net
    step $LANCET bench --model $M --dtype bf16 --gate $G --network $net --variants $VARIANTS --plan $R/plan_$net.json \
        --steps 15 --warmup 3 --profile-steps 2 --json $R/bench_$net.json --trace-dir /tmp/traces_$net
    for v in captured lancet tutel-d2; do
        mkdir -p $R/traces_$net/$v && gzip -c /tmp/traces_$net/$v/rank0.json > $R/traces_$net/$v/rank0.json.gz
    done
}
if [ "$PART" = 1 ]; then
    P=$R
    # Partitioned capture on this device and torch, small and fast, before spending time on the large model.
    step $LANCET bench --model gpt2_moe_nl2_m64_nh4_sl32_b4 --dtype bf16 --variants captured,tutel-d2 --steps 2 \
        --warmup 1 --profile-steps 0 || exit 1
    step $LANCET profile --model $M --dtype bf16 --gate $G --out $R/profile.json --passes 3 --reps 5
    for NET in nvlink ib100 ib400; do
        step $LANCET profile-comm --network $NET --out $R/comm_$NET.json --reps 5
    done
    bench nvlink
else
    P=.results
    for NET in ${NETS:-ib100 ib400}; do bench $NET; done
fi
tar -czf $OUT/results_$PART.tar.gz -C /tmp results_$PART
ls -la $OUT
