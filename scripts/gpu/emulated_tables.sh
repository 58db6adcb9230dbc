#!/usr/bin/env bash
# Emulated expert-parallel benches on one GPU: rank 0 of a W-rank job, every collective a stand-in timed by a
# regime's curve (`--emulate W:REGIME`, docs/design.md "Emulated clusters").
#
# Per model and W: one profile (under the first regime); per W and regime: profile-comm (the emulated wire,
# contention beside it); per model, W and regime: optimize and one bench of every variant. Resumable: a step
# whose output exists is skipped, so the script can be called again (e.g. once per 10-minute window) until
# the summary is complete. The short table (plan vs best tutel-dN, predicted vs measured) comes last.
#
# Usage:  bash scripts/gpu/emulated_tables.sh
# Env (defaults in brackets):
#   MODELS   ["gpt2_moe_nl12_m768_nh16_sl512_b48 gpt2_moe_nl24_m1024_nh16_sl512_b24"]; hf:NAME is a HuggingFace
#            config (--hf-config NAME, e.g. hf:qwen3-moe-h200)
#   WORLDS   ["4 8"]            REGIMES ["ib100 ib400"] (shipped names or profile-comm JSON paths)
#   VARIANTS ["eager,captured,tutel-d2,tutel-d4,lancet-dw,lancet-part,lancet"]
#   GATE [switch]  DTYPE [bf16]  STEPS [8]  WARMUP [2]  ROUNDS [1]  PROFILE_STEPS [1]  PASSES [2]  REPS [3]
#   SMS [the regime's] (--emulate-sms)  SELFTEST [1] (tests/gpu/test_emulation_cuda.py first)  COMM_MAX_BYTES (profile-comm sweep)
#   BUDGET_S [560] or DEADLINE (epoch seconds): no step starts when fewer than NEED_S [120] seconds are left,
#            no bench when fewer than BENCH_NEED_S [NEED_S] (a bench cut by the call's limit is run again whole
#            in the next call; nl24 b24's took 200-250 s with a warm Inductor cache in run 15)
#   OUT [out] (set by the GPU machine): results in EMULATED_DIR [$OUT/emulated; /tmp/emulated with PACK=1],
#            logs in its log.txt
#   PACK [0]: 1 packs EMULATED_DIR into $OUT/emulated.tgz (and the log beside it) every 30 s and after every
#            step: two files back from the device, which returns at most 8, holding what was done when a time
#            limit ended the call (a bench's partial_bench_*.json: the variants it had measured). To resume in a
#            later call: unpack it into a carried folder,
#            e.g. `mkdir -p .carry && tar xzf emulated.tgz -C .carry`, and call with EMULATED_DIR=.carry/emulated
#            and carry [".carry"]. Optimize's predicted timelines go to /tmp/emulated_pred (not returned).
#   MEASURED_DIR [docs/data]: measured_<model>_w<W>_<regime>.json there is printed beside the emulated bench
#   CACHE_CARRY [0]: 1 restores Inductor's cache from .carry/inductor.tgz and packs it back at the end
#            (scripts/gpu/inductor_cache.sh): later calls compile from the cache
#
# Time on one H200 (nl24 b24, W=8, measured in run 14 of docs/results.md; nl12 b48 estimated from runs 9-10):
# profile-comm ~15 s each; nl24 profile 1.5 min, optimize 1.9 min, bench of 7 variants 4.5 min (cold Inductor
# cache); nl12 about half of that; the self-test ~1 min. Defaults (2 models x W 4, 8 x ib100, ib400): about
# 45 min in all, so several calls of at most 10 minutes; size BUDGET_S below the call's own time limit.
set -u
source scripts/gpu/env.sh
source scripts/gpu/inductor_cache.sh  # CACHE_CARRY=1: Inductor's cache from and to the next call
restore_inductor_cache
MODELS=${MODELS:-"gpt2_moe_nl12_m768_nh16_sl512_b48 gpt2_moe_nl24_m1024_nh16_sl512_b24"}
WORLDS=${WORLDS:-"4 8"}
REGIMES=${REGIMES:-"ib100 ib400"}
VARIANTS=${VARIANTS:-eager,captured,tutel-d2,tutel-d4,lancet-dw,lancet-part,lancet}
G=${GATE:-switch}
DT=${DTYPE:-bf16}
if [ "${PACK:-0}" = 1 ]; then D="${EMULATED_DIR:-/tmp/emulated}"; else D="${EMULATED_DIR:-$OUT/emulated}"; fi
mkdir -p "$D"
BEGIN=$(date +%s)
DEADLINE=${DEADLINE:-$(( BEGIN + ${BUDGET_S:-560} ))}
LOG="$D/log.txt"

left() { echo $(( DEADLINE - $(date +%s) )); }
short() { basename "${1%.json}"; }  # a regime's name in file names (a path's stem)
# done_or_run OUTPUT CMD...: skip when OUTPUT exists; else run CMD (which writes OUTPUT) if time is left.
done_or_run() {
    local output=$1; shift
    if [ -e "$output" ]; then echo "### done already: $output" >> "$LOG"; return 0; fi
    if [ "$(left)" -lt "${NEED_S:-120}" ]; then echo "### no time for $output: $(left)s left" | tee -a "$LOG"; return 1; fi
    echo "### $(( $(date +%s) - BEGIN ))s $*" | tee -a "$LOG"
    local packer=""
    if [ "${PACK:-0}" = 1 ]; then (while sleep 30; do pack; done) & packer=$!; fi
    "$@" > >(tee -a "$LOG" | grep -v "USDT\|Warning\|warn" | tail -${TAIL:-20}) 2>&1
    local rc=$?
    [ -n "$packer" ] && kill "$packer" 2>/dev/null
    echo "### rc=$rc" | tee -a "$LOG"
    pack
    return $rc
}
# pack: with PACK=1, the results so far into $OUT (after every step, so that a call ended by its time limit
# still returns every step that finished before it)
pack() {
    [ "${PACK:-0}" = 1 ] || return 0
    tar czf "$OUT/emulated.tgz.part" -C "$(dirname "$D")" "$(basename "$D")" && mv "$OUT/emulated.tgz.part" "$OUT/emulated.tgz"
    cp "$LOG" "$OUT/emulated_log.txt"
}
emulate() { echo "--emulate $1:$2${SMS:+ --emulate-sms $SMS}"; }
model_args() { case $1 in hf:*) echo "--hf-config ${1#hf:}";; *) echo "--model $1";; esac; }

if [ "${SELFTEST:-1}" = 1 ]; then
    done_or_run "$D/selftest.ok" bash -c "python3 -m pytest -q -p no:cacheprovider tests/gpu/test_emulation_cuda.py && touch $D/selftest.ok" \
        || { echo "### the stand-ins failed their GPU self-test; see $LOG"; exit 1; }
fi

for W in $WORLDS; do
    for R in $REGIMES; do
        done_or_run "$D/comm_w${W}_$(short $R).json" $LANCET profile-comm $(emulate $W $R) \
            --out "$D/comm_w${W}_$(short $R).json" --reps 5 ${COMM_MAX_BYTES:+--max-bytes $COMM_MAX_BYTES}
    done
done

for M in $MODELS; do
    tag() { echo "$(echo ${M#hf:} | sed 's/gpt2_moe_//')_w$1"; }
    for W in $WORLDS; do
        R0=$(echo $REGIMES | cut -d' ' -f1)
        PROFILE="$D/profile_$(tag $W).json"
        done_or_run "$PROFILE" $LANCET profile $(model_args $M) --gate $G --dtype $DT $(emulate $W $R0) --out "$PROFILE" \
            --passes ${PASSES:-2} --reps ${REPS:-3} || continue
        for R in $REGIMES; do
            NAME="$(tag $W)_$(short $R)"
            COMM="$D/comm_w${W}_$(short $R).json"
            [ -e "$COMM" ] || continue
            done_or_run "$D/plan_$NAME.json" $LANCET optimize --profile "$PROFILE" --comm "$COMM" \
                --out "$D/plan_$NAME.json" --trace-dir "/tmp/emulated_pred/$NAME" || continue
            MEASURED="${MEASURED_DIR:-docs/data}/measured_${M}_w${W}_$(short $R).json"
            EXTRA=""; [ -e "$MEASURED" ] && EXTRA="--measured $MEASURED"
            NEED_S=${BENCH_NEED_S:-${NEED_S:-120}} done_or_run "$D/bench_$NAME.json" bash -c "$LANCET bench $(model_args $M) --gate $G --dtype $DT $(emulate $W $R) \
                --variants $VARIANTS --plan $D/plan_$NAME.json --steps ${STEPS:-8} --warmup ${WARMUP:-2} \
                --rounds ${ROUNDS:-1} --profile-steps ${PROFILE_STEPS:-1} --json $D/partial_bench_$NAME.json \
                --trace-dir /tmp/emulated_traces/$NAME $EXTRA && mv $D/partial_bench_$NAME.json $D/bench_$NAME.json"
        done
    done
done

echo; echo "## emulated benches ($D)" | tee -a "$LOG"
for f in "$D"/bench_*.json; do
    [ -e "$f" ] || continue
    echo; echo "### $(basename "$f")"; python3 scripts/bench_markdown.py "$f"
done | tee -a "$LOG"
echo; echo "## the emulated wire (profile-comm of the stand-ins), plan vs best tutel-dN" | tee -a "$LOG"
python3 -m lancet.app.emulation_report "$D" 2>&1 | tee -a "$LOG"
pack  # one file back for everything (the device returns at most 8 files)
pack_inductor_cache
