"""LANCET_INDUCTOR_OPTIONS: parsed and checked once, refused before launch, passed to every compile."""

from __future__ import annotations

import pytest
import torch

from lancet.app import cli
from lancet.runtime import compile as region_compile
from lancet.runtime.inductor_options import ENV, compile_options, inductor_options


def test_unset_or_empty_means_no_options():
    assert inductor_options({}) is None
    assert inductor_options({ENV: "  "}) is None
    assert inductor_options({ENV: "{}"}) is None


def test_options_are_parsed_and_checked_against_inductor_config():
    options = inductor_options({ENV: '{"triton.enable_pdl": true, "combo_kernels": true}'})
    assert options == {"triton.enable_pdl": True, "combo_kernels": True}
    with pytest.raises(ValueError, match="is not JSON"):
        inductor_options({ENV: "{combo_kernels: true}"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        inductor_options({ENV: "[1]"})
    with pytest.raises(ValueError, match="unknown Inductor option\\(s\\) no_such_option"):
        inductor_options({ENV: '{"no_such_option": 1, "combo_kernels": false}'})


def test_only_inductor_takes_options(monkeypatch):
    monkeypatch.setenv(ENV, '{"combo_kernels": true}')
    assert compile_options("inductor") == {"options": {"combo_kernels": True}}
    with pytest.raises(ValueError, match="backend is 'eager'"):
        compile_options("eager")
    monkeypatch.delenv(ENV)
    assert compile_options("eager") == {}


def test_bad_options_are_refused_before_any_rank_starts(monkeypatch, capsys):
    monkeypatch.setattr(cli, "launch", lambda *a, **k: pytest.fail("ranks were launched despite bad input"))
    monkeypatch.setenv(ENV, '{"combo_kernel": true}')
    assert cli.main(["bench", "--variants", "eager,captured"]) == 2
    err = capsys.readouterr().err
    assert "unknown Inductor option(s) combo_kernel" in err and "Traceback" not in err


def test_region_compiler_passes_the_options_to_torch_compile(monkeypatch):
    seen = []

    def fake_compile(module, **kwargs):
        seen.append(kwargs)
        return module

    monkeypatch.setattr(region_compile.torch, "compile", fake_compile)
    monkeypatch.setenv(ENV, '{"combo_kernels": true}')

    class Call:  # the fields RegionCompiler reads of a RegionCall
        module = torch.fx.symbolic_trace(torch.nn.Identity())
        region = type("Region", (), {"index": 0, "phase": "forward"})()
        impl = None

    call = Call()
    compiler = region_compile.RegionCompiler(total=1)
    compiler.attach(call)
    assert torch.equal(call.impl(torch.ones(2)), torch.ones(2))
    assert seen == [{"backend": "inductor", "fullgraph": True, "dynamic": False, "options": {"combo_kernels": True}}]
