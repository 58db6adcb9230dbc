"""Pricing of emulated collectives, regimes and their provenance, the emulation spec, the host lane."""

from __future__ import annotations

import pytest
import torch

from lancet.cost.comm import CommProfile, PiecewiseLinear
from lancet.cost.wire import Wire
from lancet.plan.artifact import RunIdentity, write_artifact
from lancet.runtime.emulation import DEFAULT_SMS, EmulationSpec
from lancet.runtime.regimes import SHIPPED_REGIMES, load_regime
from lancet.runtime.standin import CpuLane, mirrored_splits
from tests.emulation import MiB

LINEAR = CommProfile(curves={"all_to_all": PiecewiseLinear([(0.0, 1.0), (MiB, 2.0)]),
                             "all_reduce": PiecewiseLinear([(0.0, 0.5), (MiB, 4.5)])})


def test_all_to_all_priced_by_offrank_bytes_on_the_measured_world():
    wire = Wire(LINEAR, measured_world=4, world=8)
    # 3/4 MiB off-rank is what the measured even all-to-all of 1 MiB on 4 ranks sends
    assert wire.all_to_all_ms(0.75 * MiB) == pytest.approx(2.0)
    assert wire.all_to_all_ms(0.0) == pytest.approx(1.0)
    assert Wire(LINEAR, measured_world=4, world=4).all_to_all_ms(0.75 * MiB) == pytest.approx(2.0)


def test_all_reduce_priced_by_ring_link_bytes():
    # W=8: 2 B 7/8 on the link; on 2 measured ranks the all-reduce of B' moves 2 B' 1/2, so B' = 7/4 B
    wire = Wire(LINEAR, measured_world=2, world=8)
    assert wire.all_reduce_ms(MiB / 7 * 4) == pytest.approx(4.5)
    assert Wire(LINEAR, measured_world=2, world=1).all_reduce_ms(MiB) == 0.0


def test_wire_refuses_single_rank_curves():
    with pytest.raises(ValueError, match="off-rank"):
        Wire(LINEAR, measured_world=1, world=4)


@pytest.mark.parametrize("name", SHIPPED_REGIMES)
def test_shipped_regimes_load_with_their_source(name):
    regime = load_regime(name)
    assert regime.measured_world == 4
    assert set(regime.comm.curves) >= {"all_to_all", "all_reduce"}
    assert ("derived, not measured" in regime.source) == (name == "eth")
    assert "run 3" in regime.source or name == "eth"


def test_slower_regimes_are_slower():
    ms = [Wire(load_regime(n).comm, 4, 8).all_to_all_ms(64 * MiB) for n in ("nvlink", "ib400", "ib100", "eth")]
    assert ms == sorted(ms)


def _comm_file(path, world: int) -> str:
    identity = RunIdentity(model="", gate="", world_size=world, dtype="", device="cuda:X", network="ib100",
                           torch_version="2.11.0")
    write_artifact(path, "comm", identity, {"comm": LINEAR.to_json()})
    return str(path)


def test_users_profile_comm_file_is_a_regime(tmp_path):
    regime = load_regime(_comm_file(tmp_path / "mine.json", world=2))
    assert (regime.name, regime.measured_world) == ("mine", 2)
    assert "lancet profile-comm on 2 ranks" in regime.source


def test_bad_regimes_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped regime"):
        load_regime("ib200")
    with pytest.raises(ValueError, match="at least 2 ranks"):
        load_regime(_comm_file(tmp_path / "one.json", world=1))
    write_artifact(tmp_path / "p.json", "profile", RunIdentity("", "", 2, "", "", "", ""), {})
    with pytest.raises(ValueError, match="not a lancet comm file"):
        load_regime(str(tmp_path / "p.json"))


@pytest.mark.parametrize("text", ["ib100", "x:ib100", "1:ib100", "4:"])
def test_bad_emulate_specs_are_refused(text):
    with pytest.raises(ValueError):
        EmulationSpec.parse(text)


def test_emulate_spec():
    spec = EmulationSpec.parse("8:ib400", sms=3)
    assert (spec.world_size, spec.regime.name, spec.sms, spec.label) == (8, "ib400", 3, "8:ib400")
    assert spec.network == "emulated:ib400"
    # SMs: NCCL's channels under the regime where known (1 and 2 for the ib regimes), else the default
    assert [EmulationSpec.parse(f"4:{n}").sms for n in ("ib100", "ib400", "nvlink")] == [1, 2, DEFAULT_SMS]


def test_mirrored_splits():
    assert mirrored_splits(8, None, None, 4) == [2, 2, 2, 2]
    assert mirrored_splits(6, [1, 5, 0], [1, 5, 0], 3) == [1, 5, 0]
    with pytest.raises(ValueError, match="mirrors rank 0"):
        mirrored_splits(6, [5, 1, 0], [1, 5, 0], 3)
    with pytest.raises(ValueError, match="do not cover"):
        mirrored_splits(6, [1, 1, 1], [1, 1, 1], 3)
    with pytest.raises(ValueError, match="divisible"):
        mirrored_splits(7, None, None, 2)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_host_lane_runs_transfers_in_order_and_overlaps_work_between_start_and_join():
    clock = _FakeClock()
    lane = CpuLane(clock=clock, sleep=clock.sleep)
    src, dst = torch.arange(4.0), torch.empty(4)
    first = lane.transfer(src, dst, 30.0, "all_to_all", None)
    second = lane.transfer(src, src, 20.0, "all_reduce", 3)  # queued behind the first
    assert torch.equal(dst, torch.arange(4.0)) and torch.equal(src, 3 * torch.arange(4.0))
    clock.now += 0.010  # 10 ms of work between start and join are hidden
    lane.join(first)
    assert clock.slept == [pytest.approx(0.020)]
    lane.join(second)
    assert clock.now == pytest.approx(100.050)
    lane.join(second)  # joining a finished transfer does not wait
    assert len(clock.slept) == 2


def test_gpu_lane_spreads_the_copy_to_fit_the_hold():
    from lancet.runtime.standin_cuda import MAX_COPY_PROGRAMS, CudaLane

    lane = object.__new__(CudaLane)  # the sizing logic only; no device
    lane.bytes_per_ms_per_program, lane.overruns = 8e6, 0  # 8 GB/s per program
    assert lane.copy_programs(8_000_000, hold_ms=4.0) == 1  # 1 ms on one program, half the hold is 2 ms
    assert lane.copy_programs(64_000_000, hold_ms=4.0) == 4
    assert lane.copy_programs(0, hold_ms=0.0) == 1
    assert lane.overruns == 0
    with pytest.warns(UserWarning, match="longer than the wire"):
        assert lane.copy_programs(10**9, hold_ms=1.0) == MAX_COPY_PROGRAMS
    assert lane.overruns == 1


def test_gpu_lane_copies_raw_words_when_it_can():
    from lancet.runtime.standin_cuda import _flat_pair

    src, dst = torch.zeros(3, 2, dtype=torch.bfloat16), torch.empty(3, 2, dtype=torch.bfloat16)
    assert [t.dtype for t in _flat_pair(src, dst, scaled=False)] == [torch.int32, torch.int32]
    assert [t.dtype for t in _flat_pair(src, dst, scaled=True)] == [torch.bfloat16, torch.bfloat16]
    odd = torch.zeros(3, dtype=torch.bfloat16)
    assert _flat_pair(odd, odd.clone(), scaled=False)[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="contiguous"):
        _flat_pair(src.t(), dst, scaled=False)
