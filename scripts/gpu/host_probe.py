"""Host-side launch speed of this machine's CPUs, alone and beside a busy CPU.

    python3 scripts/gpu/host_probe.py [--cpus 0,1,...] [--launches N]

Prints the CPU topology the kernel reports, then, per logical CPU, the host
microseconds per tiny CUDA kernel launch with this thread pinned there; then,
with the thread on the first CPU, the same rate while a busy-looping process is
pinned to each other CPU in turn. A CPU whose busy neighbour slows launches is a
sibling of the first (shared physical core, seen by the kernel or not); ranks of
one job should not share such pairs. Last, the host cost of one small NCCL
all-to-all on a single-rank group.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch


def topology() -> dict[int, str]:
    siblings = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        siblings[cpu] = path.read_text().strip() if path.exists() else "?"
    return siblings


def launch_us(cpu: int, launches: int) -> float:
    os.sched_setaffinity(0, {cpu})
    x = torch.zeros(16, device="cuda")
    for _ in range(200):
        x.add_(1.0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(launches):
        x.add_(1.0)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / launches * 1e6


def _spin(cpu: int, stop) -> None:
    os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        for _ in range(10000):
            pass


def with_busy_neighbour(main_cpu: int, busy_cpu: int, launches: int) -> float:
    stop = mp.get_context("fork").Event()
    spinner = mp.get_context("fork").Process(target=_spin, args=(busy_cpu, stop))
    spinner.start()
    time.sleep(0.05)
    try:
        return min(launch_us(main_cpu, launches) for _ in range(3))
    finally:
        stop.set()
        spinner.join()


def nccl_all_to_all_us(reps: int) -> float:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    counts = torch.ones(16, dtype=torch.int64, device="cuda")
    for _ in range(20):
        funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, dist.group.WORLD))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, dist.group.WORLD))
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return elapsed / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", default=None, help="comma list of CPUs to probe (default: all allowed)")
    parser.add_argument("--launches", type=int, default=3000)
    parser.add_argument("--nccl-only", action="store_true")
    args = parser.parse_args()
    if args.nccl_only:
        print(f"nccl all_to_all_single host us: {nccl_all_to_all_us(500):.1f}")
        return
    siblings = topology()
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else sorted(siblings)
    print("cpu  siblings  alone_us/launch")
    alone = {cpu: min(launch_us(cpu, args.launches) for _ in range(3)) for cpu in cpus}
    for cpu in cpus:
        print(f"{cpu:3d}  {siblings[cpu]:8s}  {alone[cpu]:6.2f}")
    main_cpu = cpus[0]
    print(f"launch us on cpu {main_cpu} with a busy loop on cpu X (alone: {alone[main_cpu]:.2f})")
    for busy in cpus[1:]:
        print(f"  X={busy:3d}  {with_busy_neighbour(main_cpu, busy, args.launches):6.2f}")


if __name__ == "__main__":
    main()
