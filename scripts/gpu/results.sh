#!/usr/bin/env bash
# What the experiment driver does not do, for docs/results.md: the Holistic Trace Analysis cross-check of
# the exposed-communication figure on the traces of a driver run, and training per gate.
#   lancet experiment run experiments/dw_nl12.jsonl --out /tmp/dw_nl12 --budget-s 480   (the benches)
#   bash scripts/gpu/results.sh /tmp/dw_nl12                                            (this script)
# Logs and training metrics land in $OUT/results.tar.gz.
set -euo pipefail
source scripts/gpu/env.sh
RUN=$1
M=${MODEL:-gpt2_moe_nl12_m768_nh16_sl512_b48}
DISPATCH_ARGS=${DISPATCH:+--dispatch $DISPATCH}  # padded or ragged for the switch runs (default: padded)
R=/tmp/results; mkdir -p $R
python3 - "$RUN" <<'PY' | tee -a $R/log.txt
import gzip, shutil, sys, tempfile
from pathlib import Path
from lancet.measure.trace_metrics import hta_exposed_comm_ms, load_trace, summarize
print("line variant ours_exposed_ms hta_exposed_ms step_ms")
for variant_dir in sorted(Path(sys.argv[1]).glob("lines/*/traces/*/")):
    with tempfile.TemporaryDirectory() as tmp:  # HTA reads plain traces
        for trace in variant_dir.glob("rank*.json.gz"):
            with gzip.open(trace) as src, open(Path(tmp) / trace.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        ours = summarize(load_trace(Path(tmp) / "rank0.json"))
        print(variant_dir.parts[-3], variant_dir.name, round(ours["exposed_comm_ms"], 3),
              round(hta_exposed_comm_ms(tmp), 3), round(ours["step_ms"], 3))
PY
for G in switch batch_prioritized topk; do
    echo "### train $G" | tee -a $R/log.txt
    $LANCET train --model $M --dtype bf16 --gate $G --steps 20 --metrics-jsonl $R/train_$G.jsonl 2>&1 | tail -3 | tee -a $R/log.txt
done
tar -czf $OUT/results.tar.gz -C /tmp results
ls -la $OUT
