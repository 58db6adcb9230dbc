#!/usr/bin/env bash
# The compiled, sync-free step on one GPU: GPU tests, then one bench of every executor and baseline.
#
#   GATE=switch bash scripts/gpu/compiled_step.sh      # MODEL, GATE, STEPS, BENCH_S, RAGGED=1 (also today's ragged step),
#                                                      # CACHE_CARRY=1: Inductor's cache from and to the
#                                                      # next call (scripts/gpu/inductor_cache.sh)
#
# Logs, JSON, kernel time by family and by kernel stem (kernels_TAG.md), the replayed forwards' kernels in order (fwd_kernels_TAG_VARIANT.md, captured and part-d2) and, with RAGGED=1, forward/backward pictures under $OUT; Inductor's cache in .cache/inductor (with CACHE_CARRY=1 restored from .carry/inductor.tgz first and packed
# into $OUT/inductor.tgz.part-* after, so that a later call's compile hits it).
source scripts/gpu/env.sh
source scripts/gpu/inductor_cache.sh
restore_inductor_cache
M="${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}"
G="${GATE:-switch}"
TAG="${TAG:-${G}}"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), 'cores:', __import__('os').cpu_count())"
echo "inductor cache: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | cut -f1 || echo cold)"
run() {  # run NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local begin=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "### $name: rc=$?, $((SECONDS - begin)) s"
    grep -v -e '^USDT' -e 'SyncActivityProfilerHandler' "$OUT/$name.log" | tail -"${TAIL:-8}"
}
if [ "${GPU_TESTS:-1}" = 1 ]; then
    TAIL=6 run gpu_tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/gpu
    TAIL=12 run padded_check 90 python3 scripts/gpu/padded_check.py
fi
VARIANTS="${VARIANTS:-eager,captured:cudagraph,captured:compiled,captured:interpret,eager-compiled,tutel-d2,part-d2}"
TAIL=30 run "bench_$TAG" "${BENCH_S:-400}" $LANCET bench --model "$M" --gate "$G" --dtype bf16 --nproc 1 \
    --steps "${STEPS:-10}" --warmup 3 --profile-steps 2 --variants "$VARIANTS" \
    --json "$OUT/bench_$TAG.json" --trace-dir /tmp/traces_$TAG
if [ "${RAGGED:-0}" = 1 ]; then
    TAIL=12 run "bench_${TAG}_ragged" 100 $LANCET bench --model "$M" --gate "$G" --dispatch ragged --dtype bf16 \
        --nproc 1 --steps "${STEPS:-10}" --warmup 3 --profile-steps 1 --variants captured:interpret \
        --json "$OUT/bench_${TAG}_ragged.json" --trace-dir /tmp/traces_ragged
fi
{ python3 scripts/gpu/kernel_table.py "/tmp/traces_$TAG" captured_cudagraph 14
  python3 scripts/gpu/kernel_table.py "/tmp/traces_$TAG" captured_cudagraph 40 --by-stem; } > "$OUT/kernels_$TAG.md" 2>&1
for variant in captured_cudagraph part-d2; do  # a replayed forward, kernel by kernel
    graphed="/tmp/traces_$TAG/$variant/rank0.json"
    [ -f "$graphed" ] && python3 scripts/gpu/phase_kernels.py "$graphed" forward 3000 > "$OUT/fwd_kernels_${TAG}_$variant.md" 2>&1
done
if [ "${RAGGED:-0}" = 1 ]; then  # the forward and backward of today's step beside the compiled ones
    for phase in forward backward; do
        $LANCET timeline --phase $phase --trace /tmp/traces_ragged/captured_interpret/rank0.json --label "ragged, interpreted" \
            --trace "/tmp/traces_$TAG/captured_compiled/rank0.json" --label "padded, compiled" \
            --trace "/tmp/traces_$TAG/captured_cudagraph/rank0.json" --label "padded, CUDA graphs" \
            --out "$OUT/${phase}_$TAG.png" || true
    done
fi
pack_inductor_cache
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
fmt = lambda v: "" if v is None else f"{v:.2f}"
print("\n| bench | variant | executor | step ms | tokens/s | host issue ms | fwd GPU ms | fwd idle | fwd replay ms (events) | peak GiB | compile s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("bench_*.json")):
    for r in json.loads(path.read_text())["results"]:
        t, c = r.get("trace") or {}, r.get("compile") or {}
        print(f"| {path.stem} | {r['variant']} | {r.get('executor') or ''} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{fmt(r.get('host_issue_ms'))} | {fmt(t.get('forward_gpu_ms'))} | {fmt(t.get('forward_idle_ms'))} | "
              f"{fmt((r.get('replay_ms') or {}).get('forward'))} | {fmt(r.get('peak_mem_gib'))} | {fmt(c.get('seconds'))} |")
PY
