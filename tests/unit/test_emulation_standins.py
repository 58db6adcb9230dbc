"""Stand-in collectives on the host: mirrored results for c10d and functional calls, and time that follows the curve.

Timing bounds are generous (the machine may be shared): a wait never ends before the wire's time, and
work between start and wait is hidden.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from lancet.runtime.emulation import EmulationSpec, emulated_runtime
from tests.emulation import MiB, toy_regime

SLACK_S = 0.6  # scheduling noise a shared machine may add to one measurement


def _emulated(world: int, latency_ms: float = 0.0, ms_per_mib: float = 0.0):
    return emulated_runtime(EmulationSpec(world_size=world, regime=toy_regime(latency_ms, ms_per_mib)))


def test_c10d_collectives_return_what_mirrored_peers_give():
    with _emulated(4) as runtime:
        group = runtime.group
        for op, expected in ((dist.ReduceOp.SUM, 12.0), (dist.ReduceOp.AVG, 3.0), (dist.ReduceOp.MAX, 3.0)):
            value = torch.tensor([3.0])
            dist.all_reduce(value, op=op, group=group)
            assert value.item() == expected
        gathered: list[object] = [None] * 4
        dist.all_gather_object(gathered, {"ms": 1.5}, group=group)
        assert gathered == [{"ms": 1.5}] * 4
        out = torch.empty(8)
        dist.all_gather_into_tensor(out, torch.tensor([1.0, 2.0]), group=group)
        assert out.tolist() == [1.0, 2.0] * 4
        sent, received = torch.arange(6.0), torch.empty(6)
        dist.all_to_all_single(received, sent, [1, 2, 3, 0], [1, 2, 3, 0], group=group)
        assert torch.equal(received, sent)
        dist.barrier(group)
        value = torch.tensor([5.0])
        dist.broadcast(value, 0, group=group)
        assert value.item() == 5.0


def test_collectives_mirrored_peers_cannot_give_are_refused():
    with _emulated(2) as runtime:
        with pytest.raises(ValueError, match="mirrors rank 0"):
            dist.all_to_all_single(torch.empty(2), torch.arange(2.0), [2, 0], [1, 1], group=runtime.group)
        with pytest.raises(ValueError, match="sum, avg, max or min"):
            dist.all_reduce(torch.ones(1), op=dist.ReduceOp.PRODUCT, group=runtime.group)
        with pytest.raises(RuntimeError, match="emulated run"):
            torch.ops._c10d_functional.all_reduce(torch.ones(1), "sum", "no-such-group")


def test_functional_collectives_return_what_mirrored_peers_give():
    with _emulated(3) as runtime:
        rows = torch.arange(12.0).view(6, 2)
        received = funcol.all_to_all_single(rows, [1, 5, 0], [1, 5, 0], runtime.group)
        assert torch.equal(funcol.wait_tensor(received), rows)
        summed = funcol.all_reduce(torch.ones(2), "sum", runtime.group)
        assert funcol.wait_tensor(summed).tolist() == [3.0, 3.0]


def test_the_functional_kernels_are_restored_when_the_emulation_ends():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    with _emulated(4):
        pass
    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:  # the fake group's all-reduce leaves the tensor alone; a leftover stand-in would scale it by 4
        assert funcol.wait_tensor(funcol.all_reduce(torch.ones(2), "sum", dist.group.WORLD)).tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


def _elapsed(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def test_stand_ins_take_the_curves_time():
    # curve: 100 ms + 100 ms per MiB per rank, measured on 2 ranks
    with _emulated(2, latency_ms=100.0, ms_per_mib=100.0) as runtime:
        group = runtime.group
        payload = torch.zeros(2 * MiB // 4)  # 2 MiB: 1 MiB off-rank on 2 ranks, priced 100 + 200 ms
        expected = 0.300
        took = _elapsed(lambda: funcol.wait_tensor(funcol.all_to_all_single(payload, None, None, group)))
        assert expected <= took < expected + SLACK_S
        took = _elapsed(lambda: dist.all_to_all_single(torch.empty_like(payload), payload, group=group))
        assert expected <= took < expected + SLACK_S
    with _emulated(4, latency_ms=100.0, ms_per_mib=100.0) as runtime:
        # all-reduce of 1 MiB on 4 ranks: 2 * 3/4 MiB on the link, the measured 2-rank all-reduce of 1.5 MiB
        took = _elapsed(lambda: funcol.wait_tensor(funcol.all_reduce(torch.zeros(MiB // 4), "sum", runtime.group)))
        assert 0.250 <= took < 0.250 + SLACK_S


def test_work_between_start_and_wait_overlaps_and_transfers_queue():
    with _emulated(2, latency_ms=300.0) as runtime:
        rows = torch.zeros(4, 4)

        def overlapped():
            received = funcol.all_to_all_single(rows, None, None, runtime.group)
            time.sleep(0.300)  # host work issued while the transfer is on the wire
            funcol.wait_tensor(received)

        took = _elapsed(overlapped)
        assert 0.300 <= took < 0.480  # not 0.600: the work was hidden

        def queued():
            first = funcol.all_to_all_single(rows, None, None, runtime.group)
            second = funcol.all_to_all_single(rows, None, None, runtime.group)
            funcol.wait_tensor(first)
            funcol.wait_tensor(second)

        took = _elapsed(queued)
        assert 0.600 <= took < 0.600 + SLACK_S  # one lane: the second starts when the first ends
