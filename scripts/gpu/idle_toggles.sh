#!/usr/bin/env bash
# The step's GPU idle under environment toggles: one bench process per toggle (each process reads them as it starts).
#
#   VARIANTS=captured:cudagraph,captured:cudagraph+inline TOGGLES="base CUDA_DEVICE_MAX_CONNECTIONS=8" REPEAT=2 \
#       bash scripts/gpu/idle_toggles.sh
#
# base is lancet's defaults (one hardware queue, CUDA_DEVICE_MAX_CONNECTIONS=1, since run 18; CUDA's own default
# of 8 before); CUDA_DEVICE_MAX_CONNECTIONS=8 measures CUDA's default.
#
# MODEL [gpt2_moe_nl12_m768_nh16_sl512_b48], GATE [switch], VARIANTS [captured:cudagraph], EXTRA [] (more bench
# arguments, e.g. "--emulate 8:ib400 --plan PLAN.json"), STEPS [6], BENCH_S [150] per bench, REPEAT [1]: the
# toggle list runs REPEAT times, every other time in reverse order (so that no toggle always runs first, on a
# GPU that has just started). A toggle sets one variable (A=1), several ("A=1;B=2", quoted in TOGGLES) or none
# (base). Per bench and variant: the step (median, quartiles), the exposed all-to-all, the replayed forward
# timed by CUDA events (no profiler), the profiled forward's kernel busy time, and their
# difference: the GPU's idle in the forward without a profiler; the same for the forward's graph replayed alone
# with the host ahead of the GPU (no launch latency at the step's start). JSON and logs in $OUT.
source scripts/gpu/env.sh
M="${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}"
read -r -a toggles <<< "${TOGGLES:-base}"
for round in $(seq 1 "${REPEAT:-1}"); do
    order=("${toggles[@]}")
    if [ $((round % 2)) = 0 ]; then order=(); for t in "${toggles[@]}"; do order=("$t" "${order[@]}"); done; fi
    for toggle in "${order[@]}"; do
        name="$(echo "$toggle" | tr -c 'A-Za-z0-9_\n' '_')_r$round"
        env_args=(); [ "$toggle" != base ] && IFS=";" read -r -a env_args <<< "$toggle"  # "A=1;B=2": both set
        begin=$SECONDS
        # shellcheck disable=SC2086  # EXTRA is a list of arguments
        timeout "${BENCH_S:-150}" env "${env_args[@]}" $LANCET bench --model "$M" --gate "${GATE:-switch}" --dtype bf16 \
            --nproc 1 --steps "${STEPS:-6}" --warmup 3 --profile-steps 1 --variants "${VARIANTS:-captured:cudagraph}" \
            ${EXTRA:-} --json "$OUT/idle_$name.json" --trace-dir "/tmp/idle_traces_$name" > "$OUT/idle_$name.log" 2>&1
        echo "### $toggle (round $round): rc=$?, $((SECONDS - begin)) s"
    done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from lancet.app.bench import held_forward_idle_ms, unprofiled_forward_idle_ms
nan = float("nan")
print("\n| toggle, round | variant | step ms | q1-q3 ms | exposed a2a ms | fwd replay ms (events) | fwd kernel busy ms "
      "| fwd idle ms (events - busy) | idle % | fwd replay, host ahead ms | idle, host ahead ms | idle % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("idle_*.json")):
    for r in json.loads(path.read_text())["results"]:
        replay, busy, idle = unprofiled_forward_idle_ms(r) or (nan, nan, nan)
        held, _, held_idle = held_forward_idle_ms(r) or (nan, nan, nan)
        q1, q3 = r.get("quartiles_ms") or (nan, nan)
        print(f"| {path.stem[5:]} | {r['variant']} | {r['step_ms']:.2f} | {q1:.2f}-{q3:.2f} | "
              f"{(r.get('trace') or {}).get('exposed_a2a_ms', nan):.2f} | {replay:.2f} | {busy:.2f} | "
              f"{idle:.2f} | {100 * idle / replay:.1f} | {held:.2f} | {held_idle:.2f} | {100 * held_idle / held:.1f} |")
PY
