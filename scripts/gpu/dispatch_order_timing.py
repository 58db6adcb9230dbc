"""Device time of regrouping received rows by local expert: block shifts vs a stable sort.

    python3 scripts/gpu/dispatch_order_timing.py [--rows 24576]
"""

from __future__ import annotations

import argparse

import torch

from lancet.cost.clock import Clock
from lancet.moe.dispatch import group_by_local_expert


def by_sort(recv_counts_WL: torch.Tensor, num_received: int):
    world, local = recv_counts_WL.shape
    ids = torch.arange(local, device=recv_counts_WL.device).repeat(world)
    expert_R = torch.repeat_interleave(ids, recv_counts_WL.reshape(-1), output_size=num_received)
    perm_R = torch.argsort(expert_R, stable=True)
    return perm_R, expert_R[perm_R], torch.cumsum(recv_counts_WL.sum(dim=0), dim=0).to(torch.int32)


def by_blocks(recv_counts_WL: torch.Tensor, num_received: int):
    groups = group_by_local_expert(recv_counts_WL, num_received)
    return groups.perm_R, groups.expert_of_row_R, groups.offsets_L


def device_us(fn, *args, reps=200):
    for _ in range(10):
        fn(*args)
    return Clock(torch.device("cuda")).device_ms(lambda: fn(*args), reps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=24576)
    args = parser.parse_args()
    print(f"{'ranks':>5s} {'local':>5s} {'sort us':>8s} {'blocks us':>9s}")
    for world, local in ((1, 2), (2, 2), (4, 2), (8, 2), (8, 8)):
        weights = torch.rand(world * local)
        counts = torch.distributions.Multinomial(args.rows, weights).sample().long().view(world, local).cuda()
        rows = int(counts.sum())
        assert all(torch.equal(a, b) for a, b in zip(by_sort(counts, rows), by_blocks(counts, rows)))
        print(f"{world:5d} {local:5d} {device_us(by_sort, counts, rows):8.1f} {device_us(by_blocks, counts, rows):9.1f}")


if __name__ == "__main__":
    main()
