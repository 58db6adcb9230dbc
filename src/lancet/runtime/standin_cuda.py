"""The GPU lane of the stand-in collectives: a communication stream, a copy-then-hold kernel, events.

A transfer makes the communication stream wait for the current stream (the payload is ready),
launches ``lancet.runtime.standin_kernel`` on it, records an event, and ties both tensors to the
stream (``record_stream``) so the allocator keeps them until the kernel ends; ``join`` makes the
current stream wait for the event. Nothing waits on the host and nothing is allocated that
outlives the call, so transfers can be captured in CUDA graphs.

SM use, explicit: ``sms`` programs stay resident for the whole transfer (as NCCL keeps one block
per channel busy for a collective's duration). The payload copy is spread over enough programs
to take at most ``COPY_SHARE`` of the hold at the per-program copy rate measured when the lane
starts (never fewer than 1 nor more than ``MAX_COPY_PROGRAMS``); copy programs beyond ``sms``
exit when their part is copied. When even ``MAX_COPY_PROGRAMS`` cannot copy the payload within
the hold, the transfer takes longer than the wire's time; ``overruns`` counts those and the first
one is reported. A kernel that needs SMs waits for them like any kernel, NCCL's included: a
persistent GEMM that occupies every SM delays the stand-in's start.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

COPY_SHARE = 0.5
MAX_COPY_PROGRAMS = 32
_CALIBRATION_BYTES = 64 * 2**20
_CALIBRATION_PROGRAMS = 4


def _flat_pair(src: Tensor, dst: Tensor, scaled: bool) -> tuple[Tensor, Tensor]:
    """Both tensors as runs of elements: their own dtype when scaled, else raw bytes, as 32-bit words when both can."""
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("stand-in collectives need contiguous tensors")
    if src.numel() != dst.numel():
        raise ValueError(f"stand-in transfer of {src.numel()} elements into {dst.numel()}")
    flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
    if scaled or flat_src.numel() == 0:
        return flat_src, flat_dst
    raw_src, raw_dst = flat_src.view(torch.uint8), flat_dst.view(torch.uint8)
    if raw_src.numel() % 4 == 0 and raw_src.data_ptr() % 4 == 0 and raw_dst.data_ptr() % 4 == 0:
        return raw_src.view(torch.int32), raw_dst.view(torch.int32)
    return raw_src, raw_dst


class CudaLane:
    """Transfers on one communication stream of ``device``, each holding ``sms`` SMs for its wire time."""

    def __init__(self, device: torch.device, sms: int) -> None:
        from lancet.runtime import standin_kernel  # Triton: imported where a GPU is

        self._kernels = standin_kernel
        self.device = device
        self.sms = sms
        self.stream = torch.cuda.Stream(device)
        self._scratch = torch.zeros(1, dtype=torch.int32, device=device)
        self.overruns = 0
        self.bytes_per_ms_per_program = self._calibrate()

    def _launch(self, src: Tensor, dst: Tensor, hold_ms: float, kind: str, scale: int | None, copy_programs: int):
        flat_src, flat_dst = _flat_pair(src, dst, scale is not None)
        if flat_src.numel() == 0:  # a hold without payload still needs valid pointers
            flat_src = flat_dst = self._scratch
            n = 0
        else:
            n = flat_src.numel()
        if n >= 2**31:
            raise ValueError(f"stand-in payload of {n} elements is beyond the kernel's 32-bit indexing")
        grid = (max(copy_programs, self.sms),)
        self._kernels.KERNELS[kind][grid](
            flat_src, flat_dst, n, scale if scale is not None else 1, int(hold_ms * 1e6), copy_programs, self.sms,
            SCALE=scale is not None and scale != 1, BLOCK=self._kernels.BLOCK,
        )

    def _calibrate(self) -> float:
        """Bytes per ms one program copies, from a copy of 64 MiB on 4 programs (median of 3)."""
        src = torch.zeros(_CALIBRATION_BYTES // 4, dtype=torch.int32, device=self.device)
        dst = torch.empty_like(src)
        samples = []
        with torch.cuda.stream(self.stream):
            self._launch(src, dst, 0.0, "all_to_all", None, _CALIBRATION_PROGRAMS)  # compiles the kernel
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._launch(src, dst, 0.0, "all_to_all", None, _CALIBRATION_PROGRAMS)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        return _CALIBRATION_BYTES / max(sorted(samples)[1], 1e-3) / _CALIBRATION_PROGRAMS

    def copy_programs(self, nbytes: int, hold_ms: float) -> int:
        """Programs that copy ``nbytes`` within ``COPY_SHARE`` of ``hold_ms`` (1 .. ``MAX_COPY_PROGRAMS``)."""
        if nbytes == 0:
            return 1
        budget_ms = max(hold_ms * COPY_SHARE, 1e-6)
        needed = math.ceil(nbytes / (self.bytes_per_ms_per_program * budget_ms))
        programs = min(max(needed, 1), MAX_COPY_PROGRAMS)
        if nbytes / (self.bytes_per_ms_per_program * programs) > hold_ms:
            self._overrun(nbytes, hold_ms, programs)
        return programs

    def _overrun(self, nbytes: int, hold_ms: float, programs: int) -> None:
        self.overruns += 1
        if self.overruns == 1:
            copy_ms = nbytes / (self.bytes_per_ms_per_program * programs)
            warnings.warn(f"emulated collective of {nbytes / 2**20:.1f} MiB: copying it on {programs} programs takes "
                          f"about {copy_ms:.3f} ms, longer than the wire's {hold_ms:.3f} ms; such transfers run "
                          "slower than the regime (counted in CudaLane.overruns)", stacklevel=3)

    def transfer(self, src: Tensor, dst: Tensor, hold_ms: float, kind: str, scale: int | None) -> torch.cuda.Event:
        nbytes = src.numel() * src.element_size()
        programs = self.copy_programs(nbytes, hold_ms)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._launch(src, dst, hold_ms, kind, scale, programs)
            event = torch.cuda.Event()
            event.record(self.stream)
        src.record_stream(self.stream)
        if dst is not src:
            dst.record_stream(self.stream)
        return event

    def join(self, ticket: object) -> None:
        torch.cuda.current_stream(self.device).wait_event(ticket)
