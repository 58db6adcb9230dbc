"""Triton kernels of the GPU stand-in collectives: copy the payload on a few SMs, then hold until the wire is done.

One launch is one transfer. Programs ``pid < copy_programs`` copy ``src`` into ``dst`` (times
``scale`` when ``SCALE``) in strided blocks; programs ``pid < hold_programs`` then wait, dozing
0.5 us at a time (``nanosleep``), until the GPU's ``%globaltimer`` has advanced ``hold_ns`` past the
moment the program started, so the kernel occupies ``hold_programs`` SMs for the wire's time and
ends no earlier than it (later when the copy takes longer). The kernel names contain ``nccl`` and the collective's kind, so trace
analysis counts them as communication (``lancet.measure.trace_metrics``) and tells them apart.

Verified on an H200 (torch 2.11, ``scripts/gpu/probe_executor.py``): a copy-then-hold kernel of this
shape held its stream for 2.11 ms when asked 2.0 and 8.12 ms when asked 8.0, and 3.03 ms for 3.0
inside a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _doze():
    """Sleep the warp about 0.5 us, leaving the SM's issue slots to co-resident warps."""
    return tl.inline_asm_elementwise("nanosleep.u32 500;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _copy_then_hold(src, dst, n, scale, hold_ns, copy_programs, hold_programs, SCALE: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = _globaltimer()
    if pid < copy_programs:
        for offset in range(pid * BLOCK, n, copy_programs * BLOCK):
            index = offset + tl.arange(0, BLOCK)
            mask = index < n
            value = tl.load(src + index, mask=mask)
            if SCALE:
                value = (value * scale).to(dst.dtype.element_ty)
            tl.store(dst + index, value, mask=mask)
    if pid < hold_programs:
        now = start
        while now - start < hold_ns:
            _doze()
            now = _globaltimer()


@triton.jit
def nccl_emulated_all_to_all(src, dst, n, scale, hold_ns, copy_programs, hold_programs, SCALE: tl.constexpr,
                             BLOCK: tl.constexpr):
    _copy_then_hold(src, dst, n, scale, hold_ns, copy_programs, hold_programs, SCALE, BLOCK)


@triton.jit
def nccl_emulated_all_reduce(src, dst, n, scale, hold_ns, copy_programs, hold_programs, SCALE: tl.constexpr,
                             BLOCK: tl.constexpr):
    _copy_then_hold(src, dst, n, scale, hold_ns, copy_programs, hold_programs, SCALE, BLOCK)


KERNELS = {"all_to_all": nccl_emulated_all_to_all, "all_reduce": nccl_emulated_all_reduce}
BLOCK = 4096
