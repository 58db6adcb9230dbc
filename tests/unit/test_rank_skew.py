"""Waiting and transfer of collectives from every rank's trace: a hand-built two-rank step."""

from __future__ import annotations

import pytest

from lancet.measure.trace_metrics import STEP_ANNOTATION
from lancet.measure.rank_skew import collective_skew

SENDRECV = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"
ALLREDUCE = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


def _kernel(name, ts, dur, stream=20):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream,
            "args": {"device": 0, "stream": stream}}


def _trace(kernels, clock_offset=0.0):
    events = [{"ph": "X", "cat": "gpu_user_annotation", "name": STEP_ANNOTATION, "ts": clock_offset, "dur": 10_000,
               "pid": 0, "tid": 7, "args": {"External id": 1}}]
    events += [_kernel(name, ts + clock_offset, dur) for name, ts, dur in kernels]
    return {"traceEvents": events}


def test_waiting_is_time_before_the_last_rank_arrives():
    # all-to-all 1: rank 1 arrives 300 us late, data moves for 200 us; all-to-all 2: rank 0 is 100 us late.
    rank0 = [(SENDRECV, 1000, 500), (SENDRECV, 3100, 400), (ALLREDUCE, 5000, 1000)]
    rank1 = [(SENDRECV, 1300, 200), (SENDRECV, 3000, 500), (ALLREDUCE, 5000, 1000)]
    # rank 1's clock reads 40 us ahead in its trace: aligned by the collectives' common ends
    skew = collective_skew([_trace(rank0), _trace(rank1, clock_offset=40.0)])
    a2a, allreduce = skew["all-to-all"], skew["all-reduce"]
    assert a2a.count == 2 and allreduce.count == 1
    assert a2a.kernel_ms == pytest.approx([0.9, 0.7])
    assert a2a.wait_ms == pytest.approx([0.3, 0.1])
    assert a2a.transfer_ms == pytest.approx(0.6)
    assert a2a.last_arrivals == [1, 1] and a2a.early_ends == 0
    assert allreduce.wait_ms == pytest.approx([0.0, 0.0]) and allreduce.transfer_ms == pytest.approx(1.0)


def test_a_kernel_ending_before_the_peer_starts_is_counted():
    rank0 = [(SENDRECV, 1000, 100), (SENDRECV, 3000, 100), (SENDRECV, 5000, 100)]
    rank1 = [(SENDRECV, 1000, 100), (SENDRECV, 3500, 100), (SENDRECV, 5000, 100)]
    assert collective_skew([_trace(rank0), _trace(rank1)])["all-to-all"].early_ends == 1


def test_ranks_with_different_collectives_are_refused():
    rank0 = [(SENDRECV, 1000, 100), (SENDRECV, 3000, 100)]
    rank1 = [(SENDRECV, 1000, 100)]
    with pytest.raises(ValueError, match="different numbers of collectives"):
        collective_skew([_trace(rank0), _trace(rank1)])
