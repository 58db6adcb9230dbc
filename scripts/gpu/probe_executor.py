"""Probe what the compiled / CUDA-graph executor and the emulated collectives rely on (one GPU).

    python3 scripts/gpu/probe_executor.py

Each check prints ok/FAILED with its numbers; a summary table comes last.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

results: list[tuple[str, str]] = []


def check(name):
    def wrap(fn):
        try:
            detail = fn()
            results.append((name, f"ok {detail or ''}"))
        except Exception as err:  # report and go on
            traceback.print_exc()
            results.append((name, f"FAILED {type(err).__name__}: {str(err)[:200]}"))
        return fn
    return wrap


os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(dev), torch.cuda.nccl.version())
store = tempfile.mktemp()
dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1, device_id=dev)
group = dist.group.WORLD


@check("funcol a2a+allreduce in cuda graph")
def _():
    x = torch.randn(4096, 256, device=dev)

    def step(inp):
        y = funcol.all_to_all_single(inp, None, None, group)
        y = funcol.wait_tensor(y)
        z = funcol.all_reduce(y * 2, "sum", group)
        return funcol.wait_tensor(z)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, x * 2), "replay gave a wrong result"
    return "replay correct"


@check("a2a autograd (equal splits, None) in cuda graph with backward")
def _():
    w = torch.randn(256, 256, device=dev, requires_grad=True)
    x = torch.randn(4096, 256, device=dev)

    def step(inp):
        h = inp @ w
        y = funcol.all_to_all_single_autograd(h, None, None, group)
        loss = y.square().sum()
        (g,) = torch.autograd.grad(loss, [w])
        return loss.detach(), g

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss, grad = step(x)
    g.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grad = step(x)
    assert torch.allclose(loss, ref_loss) and torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-3)
    return "replay correct"


@check("inductor on a make_fx aten graph, then captured")
def _():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b):
        return torch.nn.functional.gelu(a @ b).sum(0) * 3

    a = torch.randn(1024, 1024, device=dev)
    b = torch.randn(1024, 1024, device=dev)
    gm = make_fx(f)(a, b)
    begin = time.perf_counter()
    compiled = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)
    out = compiled(a, b)
    torch.cuda.synchronize()
    ms_compile = (time.perf_counter() - begin) * 1e3
    assert torch.allclose(out, f(a, b), rtol=1e-3, atol=1e-2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compiled(a, b)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = compiled(a, b)
    a.copy_(torch.randn_like(a))
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, f(a, b), rtol=1e-3, atol=1e-2)
    return f"compile {ms_compile:.0f} ms"


@check("inductor compile_fx direct on aten graph")
def _():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b):
        return (torch.relu(a @ b) + 1).to(torch.bfloat16)

    a = torch.randn(512, 512, device=dev)
    b = torch.randn(512, 512, device=dev)
    gm = make_fx(f)(a, b)
    fn = torch._inductor.compile(gm, [a, b])
    out = fn(a, b)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert torch.allclose(out.float(), f(a, b).float(), rtol=1e-2, atol=1e-2)
    return ""


@check("triton globaltimer copy+hold kernel in cuda graph")
def _():
    import triton
    import triton.language as tl

    @triton.jit
    def hold_copy(src, dst, n, hold_ns, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        for off in range(pid * BLOCK, n, progs * BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < n
            tl.store(dst + idx, tl.load(src + idx, mask=mask), mask=mask)
        now = start
        while now - start < hold_ns:
            now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)

    src = torch.randn(16 * 2**20, device=dev)
    dst = torch.empty_like(src)
    comm = torch.cuda.Stream()
    def call(hold_ms):
        with torch.cuda.stream(comm):
            hold_copy[(4,)](src, dst, src.numel(), int(hold_ms * 1e6), BLOCK=1024)
    call(0.1)
    torch.cuda.synchronize()
    rows = []
    for hold in (0.5, 2.0, 8.0):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(comm); call(hold); e1.record(comm); torch.cuda.synchronize()
        rows.append(f"{hold}->{e0.elapsed_time(e1):.2f}")
    assert torch.equal(src, dst)
    g = torch.cuda.CUDAGraph()
    comm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g):
        cur = torch.cuda.current_stream()
        comm.wait_stream(cur)
        call(3.0)
        cur.wait_stream(comm)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
    rows.append(f"graph 3.0->{e0.elapsed_time(e1):.2f}")
    # the hold on 4 SMs should leave matmuls on the compute stream nearly unslowed
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter(); [a @ a for _ in range(20)]; torch.cuda.synchronize(); alone = time.perf_counter() - t0
    call(200.0)
    t0 = time.perf_counter(); [a @ a for _ in range(20)]; torch.cuda.synchronize(); shared = time.perf_counter() - t0
    rows.append(f"matmul slowdown beside hold x{shared / alone:.3f}")
    return "; ".join(rows)


@check("grouped_mm and bmm bf16")
def _():
    x = torch.randn(8, 4096, 768, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8, 768, 3072, device=dev, dtype=torch.bfloat16)
    torch.bmm(x, w)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        torch.bmm(x, w)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 20 * 1e3
    return f"bmm {ms:.3f} ms = {2 * 8 * 4096 * 768 * 3072 / ms / 1e9:.0f} TFLOP/s"


@check("stand-in kernels for _c10d_functional ops (fake group of 8) in a cuda graph")
def _():
    import subprocess, sys
    code = r"""
import torch, torch.distributed as dist, warnings, torch.distributed._functional_collectives as funcol
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
g = dist.group.WORLD
comm = torch.cuda.Stream()
events = {}
def a2a(inp, out_splits, in_splits, group_name):
    cur = torch.cuda.current_stream()
    out = torch.empty_like(inp)
    comm.wait_stream(cur)
    with torch.cuda.stream(comm):
        out.copy_(inp)
        torch.cuda._sleep(2_000_000)
        ev = torch.cuda.Event()
        ev.record(comm)
    events[out.data_ptr()] = ev
    inp.record_stream(comm); out.record_stream(comm)
    return out
def wait(t):
    ev = events.pop(t.data_ptr(), None)
    if ev is not None:
        torch.cuda.current_stream().wait_event(ev)
    return t
lib = torch.library.Library("_c10d_functional", "IMPL")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lib.impl("all_to_all_single", a2a, "CUDA")
    lib.impl("wait_tensor", wait, "CUDA")
x = torch.randn(1024, 64, device="cuda")
def step(a):
    return funcol.wait_tensor(funcol.all_to_all_single(a * 1, None, None, g)) * 2
for _ in range(2):
    step(x)
torch.cuda.synchronize()
gr = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    step(x)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(gr):
    out = step(x)
x.copy_(torch.randn_like(x))
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record(); gr.replay(); e1.record(); torch.cuda.synchronize()
assert torch.allclose(out, 2 * x)
print("REPLAY_MS", e0.elapsed_time(e1))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-1500:])
    return out.stdout.strip().splitlines()[-1]


print("\n| check | result |\n|---|---|")
for name, res in results:
    print(f"| {name} | {res} |")
dist.destroy_process_group()
