"""Stand-in collectives on a GPU: the copy-then-hold kernel's time, overlap with compute, CUDA graphs, an emulated step.

Skipped without CUDA (tests/conftest.py). Timing bounds leave 1 ms (kernel launch, a busy machine).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from lancet.app.data import BatchSource
from lancet.cost.comm import measure_contention
from lancet.models import build_model, model_config
from lancet.runtime.emulation import EmulationSpec, emulated_runtime
from lancet.step.train_step import TrainStep
from tests.emulation import MiB, tied_reference, toy_regime


def _emulated(world: int, latency_ms: float, ms_per_mib: float = 0.0):
    return emulated_runtime(EmulationSpec(world_size=world, regime=toy_regime(latency_ms, ms_per_mib)))


def _device_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def test_stand_ins_hold_the_stream_for_the_curves_time_and_mirror():
    with _emulated(4, latency_ms=5.0, ms_per_mib=0.1) as runtime:
        group = runtime.group
        rows = torch.randn(4096, 1024, device=runtime.device)  # 16 MiB: 12 MiB off-rank, the 2-rank all-to-all of 24
        expected = 5.0 + 0.1 * 24
        received = funcol.wait_tensor(funcol.all_to_all_single(rows, None, None, group))
        assert torch.equal(received, rows)
        ms = _device_ms(lambda: funcol.wait_tensor(funcol.all_to_all_single(rows, None, None, group)))
        assert expected <= ms < expected + 1.0
        grads = torch.randn(MiB, device=runtime.device, dtype=torch.bfloat16)
        summed = funcol.wait_tensor(funcol.all_reduce(grads, "sum", group))
        assert torch.equal(summed, grads * 4)


def test_compute_between_start_and_wait_overlaps():
    with _emulated(2, latency_ms=20.0) as runtime:
        a = torch.randn(4096, 4096, device=runtime.device, dtype=torch.bfloat16)
        rows = torch.randn(1024, 256, device=runtime.device)
        funcol.wait_tensor(funcol.all_to_all_single(rows, None, None, runtime.group))  # warm: first-call set-up
        _device_ms(lambda: [a @ a for _ in range(3)])  # warm: cuBLAS initialisation is not matmul time
        reps = max(1, int(20.0 / (_device_ms(lambda: [a @ a for _ in range(10)]) / 10)))
        compute_ms = _device_ms(lambda: [a @ a for _ in range(reps)])

        def overlapped():
            received = funcol.all_to_all_single(rows, None, None, runtime.group)
            for _ in range(reps):
                a @ a
            funcol.wait_tensor(received)

        together = _device_ms(overlapped)
        assert together < 20.0 + compute_ms - 0.5 * min(20.0, compute_ms)


def test_cuda_graph_replays_the_stand_ins():
    with _emulated(4, latency_ms=3.0) as runtime:
        group = runtime.group
        x = torch.randn(4096, 256, device=runtime.device)

        def step(inp):
            y = funcol.wait_tensor(funcol.all_to_all_single(inp * 1, None, None, group))
            return funcol.wait_tensor(funcol.all_reduce(y * 2, "sum", group))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x)
        x.copy_(torch.randn_like(x))
        ms = _device_ms(graph.replay)
        assert torch.allclose(out, x * 8)
        assert 6.0 <= ms < 6.0 + 2.0


def test_contention_is_measured_beside_a_stand_in():
    with _emulated(4, latency_ms=1.0, ms_per_mib=0.06) as runtime:
        compute, comm = measure_contention(runtime.group, runtime.device)
        assert compute >= 1.0 and comm >= 1.0


def test_emulated_step_on_the_gpu_follows_the_contract():
    cfg = model_config("gpt2_moe_nl3_m32_nh2_sl8_b3", vocab_size=97)
    tokens, targets = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size).batch(0, 0)
    loss, _, expected = tied_reference(cfg, 4, tokens, targets, seed=1)
    with _emulated(4, latency_ms=0.5) as runtime:
        step = TrainStep(build_model(cfg, runtime.group, device=runtime.device, seed=1), runtime.group)
        result = step(step.parameters(), tokens.to(runtime.device), targets.to(runtime.device))
        torch.testing.assert_close(result.loss.cpu(), loss, rtol=1e-4, atol=1e-5)
        for name, grad in zip(step.param_names, result.grads):
            torch.testing.assert_close(grad.cpu(), expected[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
