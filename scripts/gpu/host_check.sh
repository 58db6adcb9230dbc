#!/usr/bin/env bash
# Predicted vs measured step on one GPU for a host-bound model (tiny) and a device-bound one (nl12):
# profile -> profile-comm -> optimize (no partition) -> bench captured,lancet-dw with the plan.
#   bash scripts/gpu/host_check.sh
source scripts/gpu/env.sh
for M in gpt2_moe_nl4_m64_nh4_sl32_b8 gpt2_moe_nl12_m768_nh16_sl512_b48; do
    limit=$([ "$M" = gpt2_moe_nl4_m64_nh4_sl32_b8 ] && echo 60 || echo 100)
    timeout "$limit" $LANCET profile --model $M --dtype bf16 --out "$OUT/p_$M.json" --passes 1 --reps 2 \
        > "$OUT/prof_$M.txt" 2>&1
    echo "$M profile rc=$?"
    if [ ! -f "$OUT/c.json" ]; then
        timeout 120 $LANCET profile-comm --out "$OUT/c.json" --reps 3 > "$OUT/comm.txt" 2>&1
        echo "comm rc=$?"
    fi
    timeout 60 $LANCET optimize --profile "$OUT/p_$M.json" --comm "$OUT/c.json" --out "$OUT/plan_$M.json" \
        --no-partition > "$OUT/opt_$M.txt" 2>&1
    echo "optimize rc=$?"
    grep -E "host:" "$OUT/opt_$M.txt"
    timeout 70 $LANCET bench --model $M --dtype bf16 --variants captured,lancet-dw --plan "$OUT/plan_$M.json" \
        --steps 10 --warmup 3 --profile-steps 0 > "$OUT/bench_$M.txt" 2>&1
    echo "bench rc=$?"
    grep -E "variant|captured|lancet-dw" "$OUT/bench_$M.txt" | grep "│\|┃"
done
