#!/usr/bin/env bash
# Executors on one GPU: check them against each other, then bench the paper's small model under each.
#
#   bash scripts/gpu/executors.sh 1    # checks; eager, eager-compiled, captured under each executor
#   bash scripts/gpu/executors.sh 2    # captured, tutel-d2, part-d2 (a 2-part partitioned forward)
#   bash scripts/gpu/executors.sh 3    # profile under the default executor (region timings), optimize on it
#
# Each stage stays under 10 minutes on one H200 (16 CPU cores) from a cold machine; logs, JSON and traces go
# under $OUT (default: out/). Inductor's caches live in .cache/inductor (ignored by git), so a second stage on
# a warm machine finds the regions the first one compiled; stage 1 reports cold compile times.
source scripts/gpu/env.sh
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"
M="${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}"
STAGE="${1:-1}"
BENCH=(--model "$M" --dtype bf16 --nproc 1 --steps 10 --warmup 3 --profile-steps 2)
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, print its tail and the wall time
    local name=$1 limit=$2; shift 2
    local begin=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "### $name: rc=$rc, $((SECONDS - begin)) s"
    grep -v -e '^USDT' -e 'SyncActivityProfilerHandler' "$OUT/$name.log" | tail -"${TAIL:-25}"
}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), 'cores:', __import__('os').cpu_count())"
ls "$TORCHINDUCTOR_CACHE_DIR" >/dev/null 2>&1 && echo "inductor cache: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)" \
    || echo "inductor cache: empty (cold)"
if [ "$STAGE" = 1 ]; then
    TAIL=12 run check_executors 170 python3 scripts/gpu/check_executors.py --out "$OUT"
    run bench_executors 400 $LANCET bench "${BENCH[@]}" \
        --variants eager,eager-compiled,captured:interpret,captured:compiled,captured:cudagraph \
        --json "$OUT/bench_executors.json" --trace-dir "$OUT/traces_executors"
elif [ "$STAGE" = 2 ]; then
    run bench_partitioned 520 $LANCET bench "${BENCH[@]}" --variants captured,tutel-d2,part-d2,tutel-d2:interpret \
        --json "$OUT/bench_partitioned.json" --trace-dir "$OUT/traces_partitioned"
else
    TAIL=6 run profile_executor 380 $LANCET profile --model "$M" --dtype bf16 --nproc 1 --passes 1 --reps 3 \
        --out "$OUT/profile_executor.json"
    TAIL=3 run profile_comm 60 $LANCET profile-comm --nproc 1 --reps 3 --out "$OUT/comm.json"
    TAIL=20 run optimize 120 $LANCET optimize --profile "$OUT/profile_executor.json" --comm "$OUT/comm.json" \
        --out "$OUT/plan_executor.json" --max-partitions 2
fi
python3 - "$OUT" "$STAGE" <<'PY'
import json, sys
from pathlib import Path
out, stage = Path(sys.argv[1]), sys.argv[2]
names = {"1": ["bench_executors.json"], "2": ["bench_partitioned.json"]}.get(stage, [])
print("\n| variant | executor | step ms | tokens/s | host issue ms | fwd GPU ms | fwd idle | bwd GPU ms | bwd idle | "
      "peak GiB | compile s (regions, FX cache hit/miss) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
fmt = lambda v: "" if v is None else f"{v:.2f}"
for name in names:
    path = out / name
    if not path.exists():
        print(f"| {name} missing |"); continue
    for r in json.loads(path.read_text())["results"]:
        t, c = r.get("trace") or {}, r.get("compile") or {}
        compiled = (f"{c['seconds']:.0f} ({c['compiled_regions']}/{c['regions']}, "
                    f"{c['cache'].get('fxgraph_cache_hit', 0)}/{c['cache'].get('fxgraph_cache_miss', 0)})"
                    if c.get("compiled_regions") else "")
        print(f"| {r['variant']} | {r.get('executor') or ''} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{fmt(r.get('host_issue_ms'))} | {fmt(t.get('forward_gpu_ms'))} | {fmt(t.get('forward_idle_ms'))} | "
              f"{fmt(t.get('backward_gpu_ms'))} | {fmt(t.get('backward_idle_ms'))} | {fmt(r.get('peak_mem_gib'))} | "
              f"{compiled} |")
profile = out / "profile_executor.json"
if stage == "3" and profile.exists():
    ex = json.loads(profile.read_text())["profile"].get("executor")
    if ex:
        eager = sum(r["eager_ms"] for r in ex["regions"]); compiled = sum(r["device_ms"] for r in ex["regions"])
        print(f"\nprofile --executor (default -> {ex['kind']}): {len(ex['regions'])} compiled regions, "
              f"eager {eager:.2f} ms -> compiled {compiled:.2f} ms device; host {sum(r['host_ms'] for r in ex['regions']):.2f} "
              f"ms in region calls; step issue {ex['issue_ms']:.2f} ms")
PY
