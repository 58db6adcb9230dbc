#!/usr/bin/env bash
# Bench the working tree against a git ref, alternating processes on the same GPUs:
#   git archive REF src | tar -x -C .before     (the ref's sources, untracked)
#   bash scripts/gpu/before_after.sh           (env: MODEL, VARIANTS, STEPS, ROUNDS, NETWORK, PAIRS)
# Prints one row per process and variant; the forward's device idle time comes from a profiled step.
source scripts/gpu/env.sh
MODEL="${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}"
VARIANTS="${VARIANTS:-captured,tutel-d2}"
STEPS="${STEPS:-20}" ROUNDS="${ROUNDS:-2}" NETWORK="${NETWORK:-nvlink}" PAIRS="${PAIRS:-2}"
for pair in $(seq 1 "$PAIRS"); do
    for tree in before after; do
        src="$PWD/src"; [ "$tree" = before ] && src="$PWD/.before/src"
        name="${tree}_$pair"
        PYTHONPATH="$src:/tmp/site" timeout 280 python3 -m lancet bench --model "$MODEL" --dtype bf16 \
            --network "$NETWORK" --variants "$VARIANTS" --steps "$STEPS" --rounds "$ROUNDS" --warmup 3 \
            --profile-steps 1 --trace-dir "/tmp/ba_$name" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
        echo "$name rc=$?"
    done
done
python3 - <<'PY'
import glob, gzip, json, os
from pathlib import Path

def forward_idle_ms(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    events = [e for e in json.load(opener(path))["traceEvents"] if e.get("ph") == "X"]
    step = sorted((e for e in events if e["name"] == "lancet/step" and e.get("cat") == "gpu_user_annotation"),
                  key=lambda e: e["ts"])[-1]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                      and step["ts"] <= e["ts"] < step["ts"] + step["dur"]), key=lambda e: e["ts"])
    backward = next(e["ts"] for e in kernels if "nll_loss" in e["name"] and "backward" in e["name"])
    idle, end = 0.0, None
    for e in kernels:
        if e["ts"] >= backward:
            break
        if end is not None and e["ts"] > end:
            idle += e["ts"] - end
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
    return idle / 1e3, (backward - step["ts"]) / 1e3

out = os.environ["OUT"]
print(f"{'process':10s} {'variant':>10s} {'step ms':>8s} {'rounds':>12s} {'fwd ms':>7s} {'fwd idle':>8s}")
for path in sorted(glob.glob(f"{out}/*_[0-9].json"), key=lambda p: (p[-6], "after" in p)):
    name = Path(path).stem
    for r in json.load(open(path))["results"]:
        traces = glob.glob(f"/tmp/ba_{name}/{r['variant']}/rank0.json*")
        idle, fwd = forward_idle_ms(traces[0]) if traces else (float("nan"), float("nan"))
        rounds = " ".join(f"{x:.1f}" for x in r["round_ms"])
        print(f"{name:10s} {r['variant']:>10s} {r['step_ms']:8.2f} {rounds:>12s} {fwd:7.1f} {idle:8.2f}")
PY
