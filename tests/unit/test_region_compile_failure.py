"""A region whose compile fails runs as traced: same values, a warning, and the compile report names it."""

from __future__ import annotations

import pytest
import torch

from lancet.runtime import compile as region_compile


class _Doubler(torch.nn.Module):
    def forward(self, x):
        return x * 2


def _call(index: int):
    class Call:  # the fields RegionCompiler reads of a RegionCall
        module = torch.fx.symbolic_trace(_Doubler())
        region = type("Region", (), {"index": index, "phase": "backward"})()
        impl = None

    return Call()


def test_a_region_that_fails_to_compile_runs_as_traced(monkeypatch):
    attempts = []

    def failing_compile(module, **kwargs):
        def compiled(*args):
            attempts.append(module)
            raise torch._dynamo.exc.Unsupported("Attempt to trace generator")
        return compiled

    monkeypatch.setattr(region_compile.torch, "compile", failing_compile)
    compiler = region_compile.RegionCompiler(total=2)
    first, alike = _call(3), _call(4)
    compiler.attach(first)
    compiler.attach(alike)
    with pytest.warns(UserWarning, match="compiling backward region 3 .* failed; it runs as traced"):
        assert torch.equal(first.impl(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.warns(UserWarning, match="backward region 4"):
        assert torch.equal(alike.impl(torch.ones(2)), torch.full((2,), 2.0))
    assert len(attempts) == 1  # a region alike in structure and shapes is not tried again
    assert torch.equal(first.impl(torch.ones(2)), torch.full((2,), 2.0))  # later calls: the traced module
    report = compiler.report
    assert report.failed == ["backward region 3 (Unsupported: Attempt to trace generator)",
                             "backward region 4 (Unsupported: Attempt to trace generator)"]
    assert "2 failed to compile and run as traced, first: backward region 3" in report.summary()


def test_errors_other_than_compile_failures_propagate(monkeypatch):
    def broken_compile(module, **kwargs):
        def compiled(*args):
            raise ValueError("not a compile failure")
        return compiled

    monkeypatch.setattr(region_compile.torch, "compile", broken_compile)
    compiler = region_compile.RegionCompiler(total=1)
    call = _call(0)
    compiler.attach(call)
    with pytest.raises(ValueError, match="not a compile failure"):
        call.impl(torch.ones(2))
