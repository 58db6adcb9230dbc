"""How long the GPU idles before each kind of kernel, in a CUDA graph and in a stream the host keeps full.

    python3 scripts/gpu/gap_probe.py [--json OUT.json] [--tokens 12288] [--dim 1024] [--triton-gemm]

The replayed forward of the compiled step waits 0.3-0.8 us before a Triton kernel but 6-10 us before
each cuBLAS GEMM, cuDNN attention kernel and radix-sort pass (docs/results.md, run 15). This probe runs
chains of dependent kernels of one kind, and of two kinds alternating, each as a CUDA graph replay and as
eager launches with the host far ahead, and prints per chain: kernels, their busy time (profiled), the
whole chain timed by CUDA events with no profiler, and the idle per kernel that implies. Variants
separate candidate causes: the kernel kind itself (GEMM after GEMM), the switch from a kernel with little
shared memory to one with much (Triton then GEMM, with and without the Triton kernel's preferred
shared-memory carveout set to the maximum), graph replay against stream launch, cuBLAS against
cuBLASLt and (--triton-gemm) against an Inductor Triton GEMM, cuDNN attention against FlashAttention-2.
Needs a CUDA GPU and Triton; about a minute on an H200 (more with --triton-gemm).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
from collections.abc import Callable

import torch

from lancet.measure.kernel_names import kernel_family

CARVEOUT_ATTRIBUTE = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
REPLAYS = 20


def _triton_scale():
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(y_ptr + offsets, x * 0.5 + 0.25, mask=mask)

    handles = []

    def scale(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        compiled = scale_kernel[(triton.cdiv(n, 1024),)](x, out, n, BLOCK=1024)
        if not handles and compiled is not None:
            handles.append(compiled)
        return out

    return scale, handles


def _set_max_carveout(compiled) -> str:
    """Ask the driver to keep the SMs' shared memory at its maximum while the Triton kernel runs."""
    try:
        compiled._init_handles()
        libcuda = ctypes.CDLL("libcuda.so.1")
        rc = libcuda.cuFuncSetAttribute(ctypes.c_void_p(compiled.function), CARVEOUT_ATTRIBUTE, 100)
    except (AttributeError, OSError) as err:
        return f"not set: {err}"
    return "set" if rc == 0 else f"not set: cuFuncSetAttribute returned {rc}"


def _profiled_kernels(run: Callable[[], None]) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted(({"name": e.name, "start": e.time_range.start, "end": e.time_range.end} for e in events),
                     key=lambda k: k["start"])
    return kernels


def _event_ms(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, chain: Callable[[], None], graphed: bool) -> dict:
    """One chain: as a graph replay (``graphed``) or launched eagerly after a long kernel holds the GPU."""
    for _ in range(3):
        chain()
    torch.cuda.synchronize()
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # ends the capture even when the chain raises
            chain()
        torch.cuda.synchronize()
        run = graph.replay
    else:
        def run() -> None:  # the host issues the whole chain while a sleep kernel holds the stream
            torch.cuda._sleep(5_000_000)
            chain()

    ms = _event_ms(run, REPLAYS)
    kernels = _profiled_kernels(run)
    if not graphed:
        kernels = kernels[1:]  # the sleep is not part of the chain
        ms = None
    busy_us = sum(k["end"] - k["start"] for k in kernels)
    gaps = [b["start"] - a["end"] for a, b in zip(kernels, kernels[1:])]
    by_next: dict[str, list[float]] = {}
    for gap, after in zip(gaps, kernels[1:]):
        by_next.setdefault(kernel_family(after["name"]), []).append(gap)
    row = {"chain": name, "graphed": graphed, "kernels": len(kernels), "busy_us": busy_us,
           "events_us": None if ms is None else ms * 1e3,
           "profiled_gap_us": statistics.mean(gaps) if gaps else None,
           "gap_before_us": {k: statistics.median(v) for k, v in by_next.items()}}
    if ms is not None and kernels:
        row["idle_per_kernel_us"] = (ms * 1e3 - busy_us) / len(kernels)
    return row


def chains(tokens: int, dim: int, n: int = 32) -> tuple[dict[str, Callable[[], None]], list]:
    """The chains (about ``n`` kernels of each kind) by name, and the Triton kernel's compiled handle."""
    dt = torch.bfloat16
    x = torch.randn(tokens, dim, device="cuda", dtype=dt)
    buffers = [torch.empty_like(x), torch.empty_like(x)]
    w = torch.randn(dim, dim, device="cuda", dtype=dt) / dim**0.5
    w_router = torch.randn(dim, 8, device="cuda", dtype=dt)
    heads = 16
    q = torch.randn(tokens // 512, heads, 512, dim // heads, device="cuda", dtype=dt)
    prio = torch.rand(tokens, device="cuda")
    scale, handles = _triton_scale()

    def triton_chain():
        y = x
        for i in range(n):
            y = scale(y, buffers[i % 2])

    def aten_chain():
        y = x
        for _ in range(n):
            y = y * 0.5

    def gemm_chain():
        y = x
        for _ in range(n):
            y = y @ w

    def gemm_triton():
        y = x
        for i in range(n):
            y = scale(y @ w, buffers[i % 2])

    def gemm_aten():
        y = x
        for _ in range(n):
            y = (y @ w) * 0.5

    logits_grad = torch.randn(1229, 50304, device="cuda", dtype=dt)  # the fused loss's weight-gradient GEMM:
    hidden = torch.randn(1229, dim, device="cuda", dtype=dt)           # split-K, started 0.3 us after its input

    def dw_gemm_triton():
        for i in range(n):
            logits_grad.t() @ scale(hidden, buffers[i % 2][: hidden.shape[0]])

    def router_gemm_triton():
        for i in range(n):
            (scale(x, buffers[i % 2]) @ w_router)

    def sdpa_chain(backend):
        from torch.nn.attention import sdpa_kernel

        def chain():
            y = q
            with sdpa_kernel(backend):
                for _ in range(n // 2):
                    y = torch.nn.functional.scaled_dot_product_attention(y, q, q, is_causal=True)
        return chain

    side = torch.cuda.Stream()
    small = torch.zeros(1024, device="cuda", dtype=dt)

    def gemm_triton_fork_join():  # gemm+triton with a branch to a side stream after each pair, like a collective
        y = x
        for i in range(n):
            y = scale(y @ w, buffers[i % 2])
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                scale(small, small)
            torch.cuda.current_stream().wait_stream(side)

    def sort_chain():
        p = prio
        for _ in range(n // 4):
            p = torch.argsort(p, descending=True, stable=True).float()

    from torch.nn.attention import SDPBackend

    scale(x, buffers[0])  # compile once, so the handle exists for the carveout variant
    return {"triton": triton_chain, "aten_pointwise": aten_chain, "gemm": gemm_chain,
            "gemm+triton": gemm_triton, "gemm+triton fork/join": gemm_triton_fork_join, "gemm+aten": gemm_aten, "router_gemm+triton": router_gemm_triton,
            "loss_dw_gemm+triton": dw_gemm_triton,
            "sdpa cudnn": sdpa_chain(SDPBackend.CUDNN_ATTENTION), "sdpa flash": sdpa_chain(SDPBackend.FLASH_ATTENTION),
            "argsort": sort_chain}, handles


def triton_gemm_chain(tokens: int, dim: int) -> Callable[[], None]:
    """``gemm+aten`` with the GEMM and its epilogue as one Inductor Triton template (no cuBLAS)."""
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(dim, dim, device="cuda", dtype=torch.bfloat16) / dim**0.5
    step = torch.compile(lambda y: (y @ w) * 0.5,  # max-autotune-no-cudagraphs with Triton GEMMs only
                         options={"max_autotune": True, "triton.cudagraphs": False,
                                  "max_autotune_gemm_backends": "TRITON"})

    def chain():
        y = x
        for _ in range(32):
            y = step(y)
    return chain


def _print_row(r: dict) -> None:
    events = "" if r["events_us"] is None else f"{r['events_us']:.1f}"
    idle = "" if r.get("idle_per_kernel_us") is None else f"{r['idle_per_kernel_us']:.2f}"
    gap = "" if r["profiled_gap_us"] is None else f"{r['profiled_gap_us']:.2f}"
    before = "; ".join(f"{k}: {v:.1f}" for k, v in r["gap_before_us"].items())
    print(f"| {r['chain']} | {'yes' if r['graphed'] else 'no'} | {r['kernels']} | {r['busy_us']:.1f} | {events} | "
          f"{idle} | {gap} | {before} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--lengths", default="",
                        help="comma-separated chain lengths: only gemm+triton and triton, graphed, at each length "
                             "(does the wait before a kernel grow with the graph's size?)")
    parser.add_argument("--triton-gemm", action="store_true",
                        help="also a chain of Inductor Triton GEMM templates (autotunes: a minute or more)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gap_probe needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.__version__} {torch.cuda.get_device_name()}; chains of dependent kernels, "
          f"tokens {args.tokens}, dim {args.dim}")
    print("| chain | graph | kernels | busy us | events us | idle per kernel us | profiled gap us | median gap before |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        _print_row(row)

    if args.lengths:
        for n in (int(v) for v in args.lengths.split(",")):
            table, _ = chains(args.tokens, args.dim, n)
            for name in ("triton", "gemm+triton", "gemm+triton fork/join"):
                add({**measure(name, table[name], True), "chain": f"{name}, {n} per kind"})
            del table
            torch.cuda.empty_cache()
        _dump(args.json, rows)
        return
    table, handles = chains(args.tokens, args.dim)
    for name, chain in table.items():
        for graphed in (True, False):
            try:
                add(measure(name, chain, graphed))
            except RuntimeError as err:  # a backend this build or GPU lacks: say so, go on
                print(f"| {name} | {'yes' if graphed else 'no'} | failed: {str(err).splitlines()[0][:100]} |", flush=True)
    carveout = _set_max_carveout(handles[0]) if handles else "not set: no Triton handle"
    for name in ("triton", "gemm+triton"):
        add({**measure(name, table[name], True), "chain": f"{name}, Triton carveout max ({carveout})"})
    torch.backends.cuda.preferred_blas_library("cublaslt")
    for name in ("gemm", "gemm+aten"):
        add({**measure(name, table[name], True), "chain": f"{name}, cuBLASLt"})
    if args.triton_gemm:
        add({**measure("gemm+aten", triton_gemm_chain(args.tokens, args.dim), True),
             "chain": "gemm+aten, Inductor Triton GEMM template"})
    _dump(args.json, rows)


def _dump(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
