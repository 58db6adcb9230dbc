#!/usr/bin/env bash
# Side-by-side benches of every variant (partition + pipelining included) on the GPUs present.
# Usage: bash scripts/gpu/partition_results.sh 1   (profile, comm curves, then plans and benches for NETS, default nvlink)
#        bash scripts/gpu/partition_results.sh 2   (plans and benches for NETS, default "ib100 ib400"; reads part 1's
#                                                   files from /tmp/results_1 when this machine ran part 1, else .results)
#        bash scripts/gpu/partition_results.sh 3   (profile again plus a tutel-d2 profile and the estimate check
#                                                   (CHECK=0: no check), then plans and benches for NETS; comm curves
#                                                   measured when COMM_PROFILE=1, else copied from COMM_DIR or .results)
# Env: MODEL, GATE, DISPATCH (padded or ragged; default: the gate's), NETS, VARIANTS (VARIANTS_<net> for one regime), STEPS, ROUNDS (bench --rounds), TAG (names the output),
#      BUDGET_S (stop starting benches after this many seconds, default 540) or DEADLINE (epoch seconds),
#      NEED_S (seconds a bench needs to be started, default 150), PROFILE_PER_NET=1 (profile under each regime of NETS,
#      so the plan prices collectives by their times measured there; part 3 then skips the native profile, use CHECK=0).
# Results land in $OUT/results_<part>.tar.gz; every rank's traces of every variant in $OUT/traces_<part>_<net>.tar.gz.
set -u
source scripts/gpu/env.sh
PART=${1:-1}
M=${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}
G=${GATE:-switch}
DISPATCH_ARGS=${DISPATCH:+--dispatch $DISPATCH}
TAG=${TAG:-$PART}
R=/tmp/results_$TAG; mkdir -p $R
T=/tmp/traces_$TAG; mkdir -p $T
BEGIN=$(date +%s)
VARIANTS=${VARIANTS:-eager,captured,tutel-d2,tutel-d4,tutel-d8,lancet-dw,lancet-part,lancet}
step() { echo "### $(( $(date +%s) - BEGIN ))s $*" | tee -a $R/log.txt; "$@" > >(tee -a $R/log.txt | grep -v "USDT\|Warning\|warn" | tail -${TAIL:-25}) 2>&1; }
DEADLINE=${DEADLINE:-$(( BEGIN + ${BUDGET_S:-540} ))}
left() { echo $(( DEADLINE - $(date +%s) )); }
bench() {
    local net=$1
    if [ "$(left)" -lt "${NEED_S:-150}" ]; then echo "### skipped $net: $(left)s left" | tee -a $R/log.txt; return; fi
    local profile=$P/profile.json
    if [ "${PROFILE_PER_NET:-0}" = 1 ]; then  # collectives timed under this regime price the plan
        profile=$R/profile_$net.json
        step $LANCET profile --model $M --dtype bf16 --gate $G $DISPATCH_ARGS --network $net --out $profile --passes 3 --reps 5
    fi
    step $LANCET optimize --profile $profile --comm $P/comm_$net.json --out $R/plan_$net.json --trace-dir $R/pred_$net
    local variants; variants=$(eval echo \${VARIANTS_$net:-$VARIANTS})
    step $LANCET bench --model $M --dtype bf16 --gate $G $DISPATCH_ARGS --network $net --variants $variants --plan $R/plan_$net.json \
        --steps ${STEPS:-15} --rounds ${ROUNDS:-1} --warmup 3 --profile-steps 2 --json $R/bench_$net.json --trace-dir /tmp/tr_${TAG}_$net
    for d in /tmp/tr_${TAG}_$net/*/; do
        [ -d "$d" ] || continue; local v; v=$(basename $d)
        mkdir -p $T/${net}_$v && for f in /tmp/tr_${TAG}_$net/$v/rank*.json; do gzip -c $f > $T/${net}_$v/$(basename $f).gz; done
    done
}
if [ "$PART" = 1 ]; then
    P=$R
    # Partitioned capture on this device and torch, small and fast, before spending time on the large model.
    step $LANCET bench --model gpt2_moe_nl2_m64_nh4_sl32_b4 --dtype bf16 --variants captured,tutel-d2 --steps 2 \
        --warmup 1 --profile-steps 0 || exit 1
    step $LANCET profile --model $M --dtype bf16 --gate $G $DISPATCH_ARGS --out $R/profile.json --passes 3 --reps 5
    for NET in nvlink ib100 ib400; do
        step $LANCET profile-comm --network $NET --out $R/comm_$NET.json --reps 5
    done
    for NET in ${NETS:-nvlink}; do bench $NET; done
elif [ "$PART" = 3 ]; then
    P=$R
    if [ "$(left)" -lt "${NEED_S:-150}" ]; then echo "### skipped: $(left)s left" | tee -a $R/log.txt; exit 0; fi
    if [ "${COMM_PROFILE:-0}" = 1 ]; then
        for NET in ${NETS:-nvlink ib100}; do step $LANCET profile-comm --network $NET --out $R/comm_$NET.json --reps 5; done
    else
        cp ${COMM_DIR:-.results}/comm_*.json $R/
    fi
    [ "${PROFILE_PER_NET:-0}" = 1 ] || step $LANCET profile --model $M --dtype bf16 --gate $G $DISPATCH_ARGS --out $R/profile.json --passes 3 --reps 5
    if [ "${CHECK:-1}" = 1 ]; then
        step $LANCET profile --model $M --dtype bf16 --gate $G $DISPATCH_ARGS --out $R/profile_d2.json --passes 3 --reps 5 --tutel 2
        step python3 -m lancet.app.estimate_check --profile $R/profile.json --tutel-profile $R/profile_d2.json \
            --comm $R/comm_${CHECK_NET:-ib100}.json --json $R/estimate_check.json
    fi
    for NET in ${NETS:-nvlink ib100}; do bench $NET; done
else
    P=.results; [ -f /tmp/results_1/profile.json ] && P=/tmp/results_1
    echo "### profile and comm curves from $P" | tee -a $R/log.txt
    for NET in ${NETS:-ib100 ib400}; do bench $NET; done
fi
tar -czf $OUT/results_$TAG.tar.gz -C /tmp results_$TAG
for d in $T/*_eager; do [ -d "$d" ] || continue; net=$(basename $d _eager); tar -czf $OUT/traces_${TAG}_$net.tar.gz -C $T $(cd $T && ls -d ${net}_*); done
ls -la $OUT
