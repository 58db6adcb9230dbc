#!/usr/bin/env bash
# Does a process that replayed CUDA graphs exit? exit_probe.py in each mode, then a small `lancet bench` per
# executor; each under a time limit, Python stacks of every process dumped (SIGABRT, faulthandler) if it hangs.
source scripts/gpu/env.sh
export PYTHONFAULTHANDLER=1
echo "gdb: $(command -v gdb || echo none), py-spy: $(command -v py-spy || echo none)"
limited() {  # limited NAME SECONDS CMD...: run in the background; past SECONDS, dump stacks and kill
    local name=$1 limit=$2; shift 2
    local begin=$SECONDS
    setsid "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$!
    while kill -0 $pid 2>/dev/null && [ $((SECONDS - begin)) -lt "$limit" ]; do sleep 1; done
    if kill -0 $pid 2>/dev/null; then
        echo "### $name: still running after $limit s; processes:"
        ps -o pid,ppid,stat,etime,cmd -g $pid | cut -c1-150
        for p in $(ps -o pid= -g $pid); do
            [ -n "$(command -v gdb)" ] && timeout 30 gdb -p "$p" -batch -ex "thread apply all bt 12" > "$OUT/${name}_gdb_$p.txt" 2>&1
            kill -ABRT "$p" 2>/dev/null
        done
        sleep 3; kill -KILL -- -$pid 2>/dev/null
    fi
    wait $pid; echo "### $name: rc=$?, $((SECONDS - begin)) s"
    grep -v -e '^USDT' -e SyncActivity "$OUT/$name.log" | grep -e '^\[' -e 'File "' -e 'Thread\|thread' -e 'rc=' -e Error | tail -40
}
limited probe_keep 45 python3 scripts/gpu/exit_probe.py keep
limited probe_keep_profiled 45 python3 scripts/gpu/exit_probe.py keep profile
limited probe_release_profiled 45 python3 scripts/gpu/exit_probe.py release profile
for v in captured:cudagraph captured:compiled; do
    limited "bench_${v/:/_}" 75 $LANCET bench --model gpt2_moe_nl2_m64_nh4_sl32_b4 --gate switch --nproc 1 --steps 3 \
        --warmup 2 --profile-steps 1 --variants "$v" --json "$OUT/bench_${v/:/_}.json"
done
