#!/usr/bin/env bash
# Inductor options against step time and forward idle: one bench process per option set, same model and gate.
#
#   OPTION_SETS='{}|{"triton.enable_pdl": true}' VARIANTS=captured:cudagraph,eager-compiled bash scripts/gpu/inductor_options.sh
#
# Each set (a JSON object, '|'-separated; {} is Inductor's defaults) becomes LANCET_INDUCTOR_OPTIONS of one
# `lancet bench`; its forward kernels go to fwd_kernels_TAG.md (scripts/gpu/phase_kernels.py). Ends with a table.
source scripts/gpu/env.sh
M="${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}"
G="${GATE:-switch}"
VARIANTS="${VARIANTS:-captured:cudagraph,eager-compiled}"
IFS='|' read -ra SETS <<< "${OPTION_SETS:-{\}}"
for options in "${SETS[@]}"; do
    tag="$(printf '%s' "$options" | tr -cd 'a-z_.' | tr '.' '_')"
    tag="${G}_${tag:-default}"
    export LANCET_INDUCTOR_OPTIONS="$options"
    begin=$SECONDS
    timeout "${BENCH_S:-240}" $LANCET bench --model "$M" --gate "$G" --dtype bf16 --nproc 1 --steps "${STEPS:-8}" \
        --warmup 3 --profile-steps 1 --variants "$VARIANTS" --json "$OUT/bench_$tag.json" \
        --trace-dir "/tmp/traces_$tag" > "$OUT/bench_$tag.log" 2>&1
    echo "### $tag ($options): rc=$?, $((SECONDS - begin)) s"
    grep -v -e '^USDT' -e 'SyncActivityProfilerHandler' "$OUT/bench_$tag.log" | tail -4
    trace="/tmp/traces_$tag/captured_cudagraph/rank0.json"
    [ -f "$trace" ] && python3 scripts/gpu/phase_kernels.py "$trace" forward 700 > "$OUT/fwd_kernels_$tag.md" 2>&1
done
unset LANCET_INDUCTOR_OPTIONS
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
fmt = lambda v: "" if v is None else f"{v:.2f}"
print("\n| options | variant | step ms | tokens/s | host ms | fwd GPU ms | fwd idle ms | idle % | peak GiB | compile s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("bench_*.json"), key=lambda p: p.stat().st_mtime):
    data = json.loads(path.read_text())
    for r in data["results"]:
        t, c = r.get("trace") or {}, r.get("compile") or {}
        gpu, idle = t.get("forward_gpu_ms"), t.get("forward_idle_ms")
        share = f"{100 * idle / gpu:.1f}" if gpu and idle is not None else ""
        print(f"| {json.dumps(data.get('inductor_options') or {})} | {r['variant']} | {r['step_ms']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {fmt(r.get('host_issue_ms'))} | {fmt(gpu)} | {fmt(idle)} | {share} | "
              f"{fmt(r.get('peak_mem_gib'))} | {fmt(c.get('seconds'))} |")
PY
